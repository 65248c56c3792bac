"""Rows of a report: one flat dict per run folder, read from its files only (never retrained).

``load_run`` reads a run folder (config, metrics, manifest, partition); ``summarize_run`` turns it
into a flat row (method, dataset, partition, clients, rounds, final and best image-quality metric
with its protocol, IS, KID, parameters, MACs, bytes per tier, wall time); ``compare`` adds each row's
communication savings against the FedAvg (FULL) run with the same data split, clients and seed (and,
among several, the one with the same other sweep settings).

A run that is still training (or was stopped) is read as far as it got: ``status`` says
``"running or stopped at round r of N"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from feddiff.metrics.ledger import training_bytes
from feddiff.runs import RunDir, RunError



@dataclass
class RunData:
    """What a report reads of one run folder."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    manifest: dict[str, Any]
    partition: dict[str, Any]
    personalize: dict[str, Any] = field(default_factory=dict)  # personalize.json: the fine-tuning phase
    audit: dict[str, Any] = field(default_factory=dict)  # audit.json: the leakage audit

    @property
    def evals(self) -> list[tuple[int, dict[str, Any]]]:
        """(round, eval record) of every evaluated round, in order."""
        return [(m["round"], m["eval"]) for m in self.metrics if "eval" in m]


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read a run folder; a missing or damaged file other than config.json is read as empty."""
    rd = RunDir.open(path)
    try:
        config = json.loads(rd.config_path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{rd.config_path}: unreadable run config ({err})") from None

    def optional(file: str) -> dict[str, Any]:
        try:
            return json.loads((rd.path / file).read_text())
        except (OSError, ValueError):
            return {}

    return RunData(rd.path, name or rd.path.name, config, rd.read_metrics(), optional("manifest.json"),
                   optional("partition.json"), optional("personalize.json"), optional("audit.json"))


def metric_of(ev: dict[str, Any], key: str) -> float | None:
    """An eval record's ``key`` for the global model, or the mean over personal models."""
    v = ev.get(key, ev.get(f"{key}_mean"))
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def method_label(config: dict[str, Any]) -> str:
    """The algorithm plus what wraps it: pruning, EMA, codecs (e.g. ``fedphd + prune 0.2@init + EMA edge + up int8``)."""
    label = config["algorithm"]["name"]
    prune = config.get("prune", {})
    if prune.get("ratio", 0) > 0:
        label += f" + prune {prune['ratio']:g}@{prune['at']}"
    ema = config.get("ema", {})
    if ema.get("rule", "off") != "off":
        label += f" + EMA {ema['rule']} {ema['decay']:g}"
    for direction in ("uplink", "downlink"):
        c = config.get("compress", {}).get(direction, {})
        if c.get("codec", "identity") != "identity":
            label += f" + {direction[:-4]} {c['codec']}" + (" EF" if c.get("error_feedback") else "")
    return label


def protocol_label(ev: dict[str, Any]) -> str:
    """How the image-quality metric was measured, in one line (metric, samples, sampler, reference)."""
    p = ev.get("protocol") or {}
    if not p:
        return ev.get("label", "")
    ref = p.get("reference", "?") + (f" ({p['reference_size']})" if "reference_size" in p else "")
    return (f"{p.get('metric', ev.get('label', 'FD'))}: {p.get('num_generated', '?')} generated, "
            f"{p.get('sampler', '?')} {p.get('steps', '?')} steps vs {ref}")


def split_label(part: dict[str, Any]) -> str:
    return {"iid": "iid", "dirichlet": f"label-skew({part.get('alpha')})",
            "quantity": f"quantity-skew({part.get('alpha')})",
            "pathological": f"{part.get('classes_per_client')}-class"}.get(part["method"], part["method"])


def last_grid(run: RunData) -> list[Path]:
    """The newest sample grid(s) of a run: the global model's, or each personal model's."""
    for _, ev in reversed(run.evals):
        models = ev.get("models")
        evs = list(models.values()) if isinstance(models, dict) else [ev]
        paths = [run.path / (e.get("final_grid") or e.get("grid")) for e in evs if e.get("final_grid") or e.get("grid")]
        paths = [p for p in paths if p.is_file()]
        if paths:
            return paths
    return []


def summarize_run(path: str | Path | RunData, name: str | None = None) -> dict[str, Any]:
    """One flat row describing a finished (or partial) run."""
    run = path if isinstance(path, RunData) else load_run(path, name)
    cfg, metrics = run.config, run.metrics
    last = metrics[-1] if metrics else {}
    evals = run.evals
    ev = evals[-1][1] if evals else {}
    part = cfg["partition"]
    planned = cfg["run"]["num_rounds"]
    done = last.get("round", 0)
    tiers = training_bytes(last.get("bytes_cumulative", {}))
    row: dict[str, Any] = {
        "name": run.name,
        "algorithm": cfg["algorithm"]["name"],
        "method": method_label(cfg),
        "dataset": f"{cfg['data']['dataset']} {cfg['data']['image_size']}px",
        "split": "own data (declared sizes)" if run.partition.get("method") == "own-data" else split_label(part),
        "clients": part["num_clients"],
        "seed": cfg["run"]["seed"],
        "rounds": done,
        "num_rounds": planned,
        "status": "finished" if done >= planned else f"running or stopped at round {done} of {planned}",
        "engine": run.manifest.get("engine", "simulator"),
        "partition_hash": run.manifest.get("partition_hash") or run.partition.get("hash"),
        "train_loss": last.get("loss"),
        # training traffic: every link but the evaluation's
        "bytes_total": sum(tiers.values()),
        "bytes_tiers": tiers,
        "bytes": last.get("bytes_cumulative", {}),
        "wall_s": last.get("elapsed_s"),
    }
    dp = next((r["dp"] for r in reversed(metrics) if "dp" in r), None)
    if dp is not None:  # client-level DP: the privacy spent so far
        row["epsilon"], row["delta"] = dp["epsilon"], dp["delta"]
    cost = next((r["model_cost"] for r in reversed(metrics) if "model_cost" in r), None)
    if cost is None:
        cost = run.manifest.get("model")
    if cost is not None:  # the final architecture's size (pruned runs record it again when it changes)
        row["parameters"], row["macs"] = cost["parameters"], cost["macs"]
    if run.personalize.get("summary"):  # global vs personalised, means over clients (personalize.json)
        row["personalized"] = {"steps": run.personalize.get("steps"), "groups": run.personalize.get("groups"),
                               "rounds": run.personalize.get("rounds"), "bytes_total": run.personalize.get("bytes_total"),
                               **run.personalize["summary"]}
    if run.audit.get("summary") is not None:  # the leakage audit (audit.json), with the budget it ran under
        a = run.audit
        dp_spent = a.get("dp") or {}
        row["audit"] = {**a["summary"], "flagged": a.get("flagged", []), "clients": len(a.get("clients", {})),
                        "num_samples": a.get("num_samples"), "rounds": a.get("rounds"),
                        "threshold": (a.get("criterion") or {}).get("threshold"), "epsilon": dp_spent.get("epsilon"),
                        "seeded_noise": dp_spent.get("noise") == "seeded (not private)"}
    for key in ("heldout_loss", "fd", "kid_mean", "is_mean"):
        if key in ev:
            row[key] = ev[key]
        if f"{key}_mean" in ev:  # personal models: mean and spread over clients
            row[key] = ev[f"{key}_mean"]
            row[f"{key}_std"] = ev[f"{key}_std"]
    if "label" in ev:
        row["fd_label"] = ev["label"]
        row["protocol"] = protocol_label(ev)
    # the best of the evaluations measured as the last one was (a resume may change eval.*)
    scored = [(rnd, metric_of(e, "fd")) for rnd, e in evals
              if metric_of(e, "fd") is not None and protocol_label(e) == row.get("protocol")]
    if scored:
        best_round, best = min(scored, key=lambda t: t[1])
        row["fd_best"], row["fd_best_round"] = best, best_round
    return row


def compare(rows: list[dict[str, Any]], baseline: str = "fedavg",
            settings: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Add ``savings`` = 1 - bytes / bytes of the baseline run trained on the same data, and
    ``baseline`` = that run's name.

    The baseline of a row is a run of the plain ``baseline`` method (no codec, no pruning: its
    ``method`` is exactly ``baseline``) with the same dataset, split, partition (hash, when known),
    clients and seed, that got as far (the same number of rounds; bytes of runs stopped at different
    rounds are not comparable) and sent something. When a group holds several (a grid over, say,
    ``train.lr``), it is the one whose ``settings`` (row name -> ``{dotted key: value}``, e.g. a sweep
    point's overrides) match the row's on every key outside ``algorithm.*``; failing an exact match,
    the one matching on the most such keys, the first in row order on a tie (without ``settings``: the
    group's first). A row without a comparable baseline gets no ``savings``.
    """
    settings = settings or {}
    unset = object()

    def same(r: dict[str, Any], b: dict[str, Any]) -> int:  # keys on which b's settings match r's
        mine, theirs = settings.get(r["name"], {}), settings.get(b["name"], {})
        keys = {k for k in (*mine, *theirs) if not k.startswith("algorithm.")}
        return sum(mine.get(k, unset) == theirs.get(k, unset) for k in keys)

    def group(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r.get("dataset"), r["split"], r.get("partition_hash"), r["clients"], r["seed"], r["rounds"])

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("method", r["algorithm"]) == baseline and r["algorithm"] == baseline and r["bytes_total"] > 0:
            groups.setdefault(group(r), []).append(r)
    for r in rows:
        candidates = groups.get(group(r), [])
        if not candidates:
            continue
        b = max(candidates, key=lambda c: same(r, c))  # max keeps the first of equals
        r["savings"] = 1 - r["bytes_total"] / b["bytes_total"]
        r["baseline"] = b["name"]
    return rows


PERSONAL_METRICS = (("heldout_loss", "held-out loss", 4), ("fd", "FD (reference split)", 2),
                    ("fd_own", "FD (own distribution)", 2))


def personalized_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Global vs personalised: per run with a fine-tuning phase, each metric's mean +- std over clients
    [min, max], before (the model each client started from) and after fine-tuning."""
    cols = ["run", "method", "after round", "steps", "groups", "bytes sent"] + [
        f"{label} {side}" for _, label, _ in PERSONAL_METRICS for side in ("before", "after")]
    cells = []
    for r in rows:
        p = r.get("personalized")
        if not p:
            continue
        line = [r["name"], r["method"], _phase_round(p.get("rounds"), r["rounds"]), str(p.get("steps")),
                ", ".join(p.get("groups") or ["all"]), _fmt(p.get("bytes_total"))]
        for key, _, digits in PERSONAL_METRICS:
            for side in ("before", "after"):
                s = p.get(side, {})
                if f"{key}_mean" not in s:
                    line.append("-")
                    continue
                line.append(f"{s[f'{key}_mean']:.{digits}f} ± {s[f'{key}_std']:.{digits}f} "
                            f"[{s[f'{key}_min']:.{digits}f}, {s[f'{key}_max']:.{digits}f}]")
        cells.append(line)
    return cols, cells


def audit_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The leakage audit per run that has one: near-copies, nearest distances, membership inference, epsilon."""
    cols = ["run", "method", "after round", "epsilon", "samples", "threshold", "near-copy share mean [max]",
            "nearest pixel distance", "membership AUC mean [max]", "TPR @ 1% FPR max", "flagged clients"]
    cells = []
    for r in rows:
        a = r.get("audit")
        if not a:
            continue

        def two(key: str, digits: int) -> str:
            return "-" if f"{key}_mean" not in a else f"{a[f'{key}_mean']:.{digits}f} [{a[f'{key}_max']:.{digits}f}]"

        eps = a.get("epsilon")
        budget = "no DP" if eps is None else f"{eps:.3g}" + (" (seeded noise: not private)" if a.get("seeded_noise")
                                                             else "")
        cells.append([r["name"], r["method"], _phase_round(a.get("rounds"), r["rounds"]), budget,
                      str(a.get("num_samples")), _fmt(a.get("threshold"), "g"), two("near_copy_fraction", 3), _fmt(a.get("nn_pixel_min_min")), two("mia_auc", 3),
                      _fmt(a.get("mia_tpr_at_1pct_fpr_max"), ".3f"),
                      f"{len(a['flagged'])} of {a['clients']}" + (f" ({', '.join(a['flagged'])})" if a["flagged"] else "")])
    return cols, cells


def _phase_round(phase: Any, trained: int) -> str:
    """The round an end-of-run record was made after, marked when the run has trained on since."""
    if phase is None:
        return "-"
    return str(phase) if phase == trained else f"{phase} (stale: the run is at round {trained})"


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def table(rows: Iterable[dict[str, Any]], title: str) -> Table:
    rows = list(rows)
    t = Table(title=title)
    fd_label = next((r["fd_label"] for r in rows if "fd_label" in r), "FD")
    cols = ["point", "algorithm", "split", "clients", "rounds", "heldout loss", fd_label, "MB total",
            "savings vs FULL"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("point", "algorithm", "split") else "right")
    for r in rows:
        def pm(key: str, spec: str) -> str:
            if key not in r:
                return "-"
            s = _fmt(r[key], spec)
            return s + (f" ± {_fmt(r[key + '_std'], spec)}" if f"{key}_std" in r else "")

        t.add_row(escape(r["name"]), r["algorithm"], r["split"], str(r["clients"]), str(r["rounds"]),
                  pm("heldout_loss", ".4f"), pm("fd", ".2f"), f"{r['bytes_total'] / 1e6:.1f}",
                  f"{100 * r['savings']:.1f}%" if "savings" in r else "-")
    return t
