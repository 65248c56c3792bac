"""The report's plots, from run folders' records only (matplotlib's Agg backend: no display needed).

Every function takes the runs (:class:`~feddiff.report.rows.RunData`) and a folder, writes PNGs
there and returns ``{title: path}`` of what it drew; a figure with nothing to show is not written.

- ``quality_vs_round``: the image-quality metric, the held-out loss and the training loss per round,
  one line per run (personalised runs: the mean over clients, with the min-max band).
- ``quality_vs_bytes``: the metric against cumulative training bytes, one line per run.
- ``bytes_per_round``: bytes (up + down) per round, one panel per tier (client-server,
  client-edge, edge-cloud), one line per run.
- ``client_spread``: the final metric of every personal model, per personalised run.
- ``partitions``: label counts per client, one heatmap per distinct data split.
"""

from __future__ import annotations

import re
from pathlib import Path

from feddiff.metrics.ledger import training_bytes
from feddiff.report.rows import RunData, metric_of


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _label(runs: list[RunData], run: RunData) -> str:
    """A run's legend label: its method when no other run has that method, else its name."""
    from feddiff.report.rows import method_label

    methods = [method_label(r.config) for r in runs]
    mine = method_label(run.config)
    return mine if methods.count(mine) == 1 else run.name


def _color(runs: list[RunData], run: RunData) -> str:
    """One colour per run, the same in every figure."""
    return f"C{runs.index(run) % 10}"


def _rounds_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, runs: list[RunData]) -> None:
    if len(runs) > 1 or ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def metric_label(runs: list[RunData]) -> str:
    labels = sorted({ev["label"] for r in runs for _, ev in r.evals if "label" in ev})
    return " / ".join(labels) if labels else "FD"


def _series(run: RunData, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(rounds, values, lows, highs) of an eval metric; lows/highs are the personal models' min/max."""
    xs, ys, lo, hi = [], [], [], []
    for rnd, ev in run.evals:
        v = metric_of(ev, key)
        if v is None:
            continue
        xs.append(rnd)
        ys.append(v)
        lo.append(ev.get(f"{key}_min", v))
        hi.append(ev.get(f"{key}_max", v))
    return xs, ys, lo, hi


def quality_vs_round(runs: list[RunData], out: Path) -> dict[str, Path]:
    plt = _plt()
    panels = [("fd", metric_label(runs)), ("heldout_loss", "held-out denoising loss")]
    panels = [(k, t) for k, t in panels if any(_series(r, k)[0] for r in runs)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.6 * (len(panels) + 1), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for r in runs:
            xs, ys, lo, hi = _series(r, key)
            if not xs:
                continue
            ax.plot(xs, ys, marker="o", ms=3, label=_label(runs, r), color=_color(runs, r))
            if lo != ys or hi != ys:
                ax.fill_between(xs, lo, hi, color=_color(runs, r), alpha=0.18)
        ax.set(title=f"{title} (lower is better)", xlabel="round")
        _rounds_axis(ax)
        _legend(ax, runs)
    ax = axes[0][-1]
    for r in runs:
        pts = [(m["round"], m["loss"]) for m in r.metrics if isinstance(m.get("loss"), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=_label(runs, r), color=_color(runs, r))
    ax.set(title="training loss (clients' mean)", xlabel="round")
    _rounds_axis(ax)
    _legend(ax, runs)
    return {"Quality and loss per round": _save(fig, out / "quality_vs_round.png")}


def quality_vs_bytes(runs: list[RunData], out: Path) -> dict[str, Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    spans = []
    key = "fd" if any(_series(r, "fd")[0] for r in runs) else "heldout_loss"
    name = metric_label(runs) if key == "fd" else "held-out denoising loss"
    for r in runs:
        by_round = {m["round"]: sum(training_bytes(m.get("bytes_cumulative", {})).values()) / 1e6 for m in r.metrics}
        xs, ys, _, _ = _series(r, key)
        pts = [(by_round[x], y) for x, y in zip(xs, ys) if x in by_round]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=_label(runs, r), color=_color(runs, r))
            spans += [p[0] for p in pts if p[0] > 0]
    if not spans:
        plt.close(fig)
        return {}
    if max(spans) / min(spans) > 50:
        ax.set_xscale("log")
    ax.set(title=f"{name} against communication (lower is better)",
           xlabel="cumulative training MB (all tiers, up + down, setup included)", ylabel=name)
    _legend(ax, runs)
    return {"Quality against bytes sent": _save(fig, out / "quality_vs_bytes.png")}


def bytes_per_round(runs: list[RunData], out: Path) -> dict[str, Path]:
    plt = _plt()
    tiers = sorted({link for r in runs for m in r.metrics for link in training_bytes(m.get("bytes", {}))})
    if not tiers:
        return {}
    fig, axes = plt.subplots(1, len(tiers), figsize=(4.6 * len(tiers), 3.6), squeeze=False)
    for ax, tier in zip(axes[0], tiers):
        for r in runs:
            pts = [(m["round"], sum(m.get("bytes", {}).get(tier, {}).values()) / 1e6) for m in r.metrics]
            setup = sum(sum(m.get("bytes_setup", {}).get(tier, {}).values()) for m in r.metrics) / 1e6
            if setup:  # once-per-run setup traffic (label histograms, reference statistics): round 0
                pts.insert(0, (0, setup))
            if any(v for _, v in pts):
                ax.plot(*zip(*pts), marker=".", label=_label(runs, r), color=_color(runs, r))
        ax.set(title=f"{tier}: MB per round (up + down)", xlabel="round (0: setup)")
        _rounds_axis(ax)
        ax.set_ylim(bottom=0)
        _legend(ax, runs)
    return {"Bytes per round, per tier": _save(fig, out / "bytes_per_round.png")}


def client_spread(runs: list[RunData], out: Path) -> dict[str, Path]:
    """Final per-client metric of personalised runs (UDEC, ULATDEC): one column of points per run."""
    plt = _plt()
    cols = []
    key = "fd" if any(_series(r, "fd")[0] for r in runs) else "heldout_loss"
    for r in runs:
        for _, ev in reversed(r.evals):
            models = ev.get("models")
            if isinstance(models, dict) and models:
                vals = [(cid, metric_of(m, key)) for cid, m in models.items()]
                vals = [(cid, v) for cid, v in vals if v is not None]
                if vals:
                    cols.append((r.name, vals))
                break
    if not cols:
        return {}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(cols) + 2), 3.8))
    for i, (name, vals) in enumerate(cols):
        ys = [v for _, v in vals]
        ax.scatter([i] * len(ys), ys, s=18, alpha=0.8, color=_color(runs, next(r for r in runs if r.name == name)))
        mean = sum(ys) / len(ys)
        ax.hlines(mean, i - 0.25, i + 0.25, colors="k", linewidth=1)
    ax.set_xticks(range(len(cols)), [name for name, _ in cols], rotation=15, fontsize=7)
    ax.set_xlim(-0.6, len(cols) - 0.4)
    name = metric_label(runs) if key == "fd" else "held-out loss"
    ax.set_title(f"final {name} of each personal model\n(bar: mean over clients)", fontsize=9)
    ax.set_ylabel(name)
    return {"Per-client spread of personal models": _save(fig, out / "client_spread.png")}


def partitions(runs: list[RunData], out: Path) -> dict[str, Path]:
    """One heatmap of label counts per client for every distinct split (by the partition's hash)."""
    plt = _plt()
    seen: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:  # one split per dataset and partition (the hash covers the indices only)
        if r.partition.get("label_histograms"):
            key = (r.config["data"]["dataset"], str(r.partition.get("hash") or r.name))
            seen.setdefault(key, []).append(r)
    figs = {}
    for (dataset, h), users in seen.items():
        part = users[0].partition
        counts = part["label_histograms"]
        classes = part.get("classes") or [str(i) for i in range(len(counts[0]))]
        n = len(counts)
        # at most ~12 inches tall whatever the client count; per-client labels while they fit
        fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * len(classes) + 2.5), min(12.0, max(2.4, 0.32 * n + 1.6))))
        im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        if n <= 40:
            ax.set_yticks(range(n), [f"client {i} ({sum(c)})" for i, c in enumerate(counts)], fontsize=7)
        else:
            ax.set_ylabel(f"client (0..{n - 1})")
        if n * len(classes) <= 400 and n <= 40:
            top = max(max(c) for c in counts) or 1
            for i, row in enumerate(counts):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                            color="white" if v < top / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.04)
        names = ", ".join(u.name for u in users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
        ax.set_title(f"label counts per client: {dataset}, {part.get('method', '?')} split {h} ({names})", fontsize=8)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}-{h}")
        figs[f"Partition {dataset} {h}"] = _save(fig, out / f"partition-{stem}.png")
    return figs


def all_figures(runs: list[RunData], out: Path, problems: list[str] | None = None) -> dict[str, Path]:
    """Every figure that has something to show; one that fails is left out and described in ``problems``."""
    import matplotlib

    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    # run names are text, never math: a "$" in a folder name must not be parsed as TeX
    with matplotlib.rc_context({"text.parse_math": False}):
        for make in (quality_vs_round, quality_vs_bytes, bytes_per_round, client_spread, partitions):
            try:
                figs.update(make(runs, out))
            except Exception as err:  # noqa: BLE001 - one figure's failure must not lose the report
                _plt().close("all")
                if problems is None:
                    raise
                problems.append(f"figure {make.__name__} could not be drawn: {type(err).__name__}: {err}")
    return figs


__all__ = ["all_figures", "bytes_per_round", "client_spread", "partitions", "quality_vs_bytes", "quality_vs_round"]
