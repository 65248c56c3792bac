"""``feddiff report RUN_DIR... --out DIR``: a self-contained HTML page and a Markdown summary.

Reads run folders only (a sweep folder stands for the runs in it) and writes into ``DIR``:

- ``report.html``: the table, the figures and each run's last sample grid, images inlined as data
  URIs, no external file or script, so the one file can be mailed or archived;
- ``report.md``: the same table and links to ``figures/*.png`` and ``grids/*.png``;
- ``summary.json``: the rows, every number as read from the runs' ``metrics.jsonl``.

It can be re-run while runs train: ``metrics.jsonl`` is written and flushed once per round, and a
row says how far an unfinished run got.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddiff.report.figures import all_figures
from feddiff.report.rows import (
    RunData, audit_cells, compare, last_grid, load_run, personalized_cells, summarize_run,
)
from feddiff.runs import RunError, atomic_write_json


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    html: Path
    markdown: Path
    summary: Path
    rows: list[dict[str, Any]]
    figures: dict[str, Path] = field(default_factory=dict)
    grids: dict[str, list[Path]] = field(default_factory=dict)


def find_runs(paths: list[str | Path]) -> list[tuple[Path, str, dict[str, Any]]]:
    """(run folder, name, sweep settings) of the runs named by ``paths``; raises RunError if none.

    A path is a run folder, a sweep folder (its started points, named as in the sweep, with their
    settings so that each is compared with the FedAvg point of the same other settings), or a folder
    of runs and sweeps (one level down). Names are made unique: a name shared by two runs is prefixed
    with the parent folder's (then numbered if still shared).
    """
    from feddiff.sweep import point_settings, sweep_runs

    def sweep(p: Path) -> list[tuple[Path, str | None, dict[str, Any]]]:
        return [(path, name, point_settings(overrides)) for name, overrides, path in sweep_runs(p)
                if (path / "config.json").is_file()]

    found: list[tuple[Path, str | None, dict[str, Any]]] = []
    for p in map(Path, paths):
        if (p / "config.json").is_file():
            found.append((p, None, {}))
        elif (p / "sweep.json").is_file():
            found += sweep(p)
        elif p.is_dir():
            inside = sorted(d for d in p.iterdir() if d.is_dir())
            runs = [d for d in inside if (d / "config.json").is_file()]
            sweeps = [d for d in inside if (d / "sweep.json").is_file()]
            if not runs and not sweeps:
                raise RunError(f"{p} is not a run folder (no config.json) and holds no run or sweep folder")
            found += [(d, None, {}) for d in runs]
            for d in sweeps:
                found += sweep(d)
        elif p.exists():
            raise RunError(f"{p} is a file, not a run folder")
        else:
            raise RunError(f"{p}: no such run folder")
    seen, unique = set(), []
    for path, name, settings in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append((path, name or path.name, settings))
    if not unique:
        raise RunError(f"no started run in {', '.join(map(str, paths))}: nothing to report")
    names = [n for _, n, _ in unique]
    named = [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n, _ in unique]
    out = []
    for i, (p, _, settings) in enumerate(unique):
        n = named[i]
        out.append((p, n if named.count(n) == 1 else f"{n}#{named[:i].count(n) + 1}", settings))
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# -- formatting ---------------------------------------------------------------------------------


def _num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(row: dict[str, Any], key: str, digits: int) -> str:
    if key not in row:
        return "-"
    s = _num(row[key], digits)
    return s + (f" ± {_num(row[key + '_std'], digits)}" if f"{key}_std" in row else "")


def _si(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}" if n >= 1e7 else f"{n / 1e6:.2f}"


def _wall(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def protocols_of(rows: list[dict[str, Any]]) -> list[str]:
    """The distinct image-quality protocols, in row order: row ``i``'s is footnote ``[k]``."""
    out: list[str] = []
    for r in rows:
        if r.get("protocol") and r["protocol"] not in out:
            out.append(r["protocol"])
    return out


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The report's table: column titles and one list of cells per row.

    Each row names its own image-quality metric and protocol (``FD-domain [1]``: footnote 1 lists
    how it was measured), so runs measured differently are never read as one column.
    """
    protocols = protocols_of(rows)
    tiers = sorted({t for r in rows for t in r["bytes_tiers"]})
    cols = ["run", "method", "dataset", "split", "clients", "rounds", "metric [protocol]", "final", "best (round)",
            "IS", "KID", "held-out loss", "parameters", "MACs", *[f"MB {t}" for t in tiers], "MB total",
            "savings vs FedAvg", "wall", "status"]
    private = any("epsilon" in r for r in rows)
    if private:
        cols.insert(cols.index("wall"), "DP epsilon (delta)")
    out = []
    for r in rows:
        metric = f"{r['fd_label']} [{protocols.index(r['protocol']) + 1}]" if r.get("protocol") in protocols else "-"
        best = f"{_num(r['fd_best'])} ({r['fd_best_round']})" if "fd_best" in r else "-"
        if "savings" not in r:
            savings = "-"
        elif r.get("baseline") == r["name"]:
            savings = "baseline"
        else:
            savings = f"{100 * r['savings']:.1f}% (vs {r['baseline']})"
        out.append([
            r["name"], r["method"], r["dataset"], r["split"], str(r["clients"]), f"{r['rounds']}/{r['num_rounds']}",
            metric, _pm(r, "fd", 2), best, _pm(r, "is_mean", 3), _pm(r, "kid_mean", 3), _pm(r, "heldout_loss", 4),
            _si(r.get("parameters"), ""), _si(r.get("macs"), ""),
            *[_mb(r["bytes_tiers"][t]) if t in r["bytes_tiers"] else "-" for t in tiers], _mb(r["bytes_total"]),
            savings, _wall(r.get("wall_s")), r["status"],
        ])
        if private:
            out[-1].insert(cols.index("DP epsilon (delta)"),
                           f"{r['epsilon']:.3g} ({r['delta']:g})" if "epsilon" in r else "none")
    return cols, out


# -- writers ------------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|!])")


def md_escape(text: str) -> str:
    """Text that Markdown shows as it is: no emphasis, links, code, table cells or raw HTML."""
    text = " ".join(str(text).split())  # newlines would end a table row or a heading
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)



def _markdown(title: str, rows: list[dict[str, Any]], figures: dict[str, Path], grids: dict[str, list[Path]],
              out: Path, problems: list[str]) -> str:
    cols, cells = table_cells(rows)
    md = md_escape
    lines = [f"# {md(title)}", "", f"{len(rows)} run(s); every number is read from the runs' `metrics.jsonl`.", "",
             "| " + " | ".join(md(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in cells]
    protocols = protocols_of(rows)
    if protocols:
        lines += ["", "Image-quality protocols:", *[f"{i}. {md(p)}" for i, p in enumerate(protocols, 1)]]
    lines += [f"- note: {md(p)}" for p in problems]
    pcols, pcells = personalized_cells(rows)
    if pcells:
        lines += ["", "## Global vs personalised (each client fine-tunes on its own data)", "",
                  "Mean ± std over clients [min, max], before and after fine-tuning.", "",
                  "| " + " | ".join(md(c) for c in pcols) + " |", "|" + "---|" * len(pcols)]
        lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in pcells]
    acols, acells = audit_cells(rows)
    if acells:
        lines += ["", f"## {AUDIT_HEADING}", "", md(AUDIT_TEXT), "",
                  "| " + " | ".join(md(c) for c in acols) + " |", "|" + "---|" * len(acols)]
        lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in acells]
    for heading, path in figures.items():
        lines += ["", f"## {md(heading)}", "", f"![{md(heading)}]({path.relative_to(out).as_posix()})"]
    if grids:
        lines += ["", "## Last sample grids", ""]
        for name, paths in grids.items():
            lines.append(f"**{md(name)}**: " + " ".join(f"![{md(name)}]({p.relative_to(out).as_posix()})" for p in paths))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


AUDIT_HEADING = "Leakage audit (generated images against each client's training images)"
AUDIT_TEXT = ("Near-copies by Carlini et al. 2023's normalised distance; membership inference by denoising loss "
              "against label-matched held-out images (AUC 0.5: no signal).")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:nth-child(-n+4) { text-align: left; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
img.grid { image-rendering: pixelated; width: 256px; border: 1px solid #ccc; }
#status { font-size: 0.8em; color: #a00; }
"""

# Marks the page for automated checks (and tells a reader): every image decoded, or which did not.
_CHECK = """
window.feddiffErrors = [];
window.addEventListener('error', e => { window.feddiffErrors.push(String(e.message || e)); });
window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || '?');
  const errs = window.feddiffErrors;
  const status = errs.length ? 'script error: ' + errs.join('; ') : bad.length ? 'missing image: ' + bad.join(', ') : 'ok';
  document.body.dataset.status = status;
  document.getElementById('status').textContent = status === 'ok' ? '' : status;
});
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(title: str, rows: list[dict[str, Any]], figures: dict[str, Path], grids: dict[str, list[Path]],
          problems: list[str]) -> str:
    e = html.escape
    cols, cells = table_cells(rows)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style><script>{_CHECK}</script></head><body>",
             f"<h1>{e(title)}</h1><p id='status'></p>",
             f"<p>{len(rows)} run(s); every number is read from the runs' <code>metrics.jsonl</code>.</p>",
             "<div style='overflow-x:auto'><table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in cells]
    parts.append("</tbody></table></div>")
    protocols = protocols_of(rows)
    if protocols:
        parts.append("<p>Image-quality protocols:</p><ol>" + "".join(f"<li>{e(p)}</li>" for p in protocols) + "</ol>")
    parts += [f"<p class='note'>note: {e(p)}</p>" for p in problems]
    pcols, pcells = personalized_cells(rows)
    if pcells:
        parts.append("<h2>Global vs personalised (each client fine-tunes on its own data)</h2>"
                     "<p>Mean ± std over clients [min, max], before and after fine-tuning.</p>"
                     "<div style='overflow-x:auto'><table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in pcols)
                     + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in pcells]
        parts.append("</tbody></table></div>")
    acols, acells = audit_cells(rows)
    if acells:
        parts.append(f"<h2>{e(AUDIT_HEADING)}</h2><p>{e(AUDIT_TEXT)}</p><div style='overflow-x:auto'><table><thead><tr>"
                     + "".join(f"<th>{e(c)}</th>" for c in acols) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in acells]
        parts.append("</tbody></table></div>")
    for heading, path in figures.items():
        parts.append(f"<h2>{e(heading)}</h2><img alt='{e(heading)}' src='{_data_uri(path)}'>")
    if grids:
        parts.append("<h2>Last sample grids</h2>")
        for name, paths in grids.items():
            for p in paths:
                caption = name + (f" ({p.stem.split('-')[-1]})" if len(paths) > 1 else "")
                parts.append(f"<figure><img class='grid' alt='{e(caption)}' src='{_data_uri(p)}'>"
                             f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


_OWN = ("report.html", "report.md", "summary.json", "figures", "grids")


def _check_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier report; a folder holding anything else is refused."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a folder for the report")
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir())
        foreign = [n for n in names if n not in _OWN]
        if foreign or (names and "summary.json" not in names):
            raise RunError(f"--out {out} already holds files that are not a feddiff report (e.g. "
                           f"{(foreign or names)[:3]}); choose a new or empty folder")


def _swap_in(new: Path, out: Path) -> None:
    """Replace the report in ``out`` by the one built in ``new`` (a sibling folder), entry by entry."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("figures", "grids"):
        old = out / name
        if old.exists():
            shutil.rmtree(old)
        (new / name).replace(old)
    for name in ("summary.json", "report.md", "report.html"):
        (new / name).replace(out / name)


def build_report(paths: list[str | Path], out: str | Path, title: str | None = None) -> Report:
    """Read the runs in ``paths`` and write the report into ``out``.

    The report is built in a temporary folder beside ``out`` and moved in only when complete, so a
    failure leaves an earlier report as it was. A figure that cannot be drawn is left out and named
    in the report, not fatal.
    """
    out = Path(out)
    found = find_runs(paths)
    for p, _, _ in found:  # never write into a run folder: the report is beside the runs, not inside one
        if out.resolve() == p.resolve() or p.resolve() in out.resolve().parents:
            raise RunError(f"--out {out} is inside the run folder {p}; choose a folder outside the runs")
    _check_out(out)
    runs: list[RunData] = [load_run(p, name) for p, name, _ in found]
    rows = compare([summarize_run(r) for r in runs], settings={name: s for _, name, s in found if s})
    title = title or ("feddiff report: " + ", ".join(sorted({row["method"] for row in rows})))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        problems: list[str] = []
        figures = {k: out / "figures" / p.name for k, p in all_figures(runs, tmp / "figures", problems).items()}
        grids: dict[str, list[Path]] = {}
        (tmp / "grids").mkdir()
        for i, r in enumerate(runs):
            copied = []
            for src in last_grid(r):
                name = f"{i + 1:02d}-{_safe(r.name)}-{_safe(src.stem)}.png"  # numbered: names never collide
                shutil.copyfile(src, tmp / "grids" / name)
                copied.append(out / "grids" / name)
            if copied:
                grids[r.name] = copied
            # the fine-tuned models' grids beside the model they started from; the audit's closest pairs
            for label, kind, files in (
                    ("personalised", "personalized", {n: c.get("after", {}).get("grid") for n, c in
                                                      r.personalize.get("clients", {}).items()}),
                    ("closest generated over training pairs", "closest", {n: c.get("strip") for n, c in
                                                                          r.audit.get("clients", {}).items()})):
                copied = []
                for node, rel in sorted(files.items()):
                    if rel and (r.path / rel).is_file():
                        name = f"{i + 1:02d}-{_safe(r.name)}-{kind}-{_safe(node)}.png"
                        shutil.copyfile(r.path / rel, tmp / "grids" / name)
                        copied.append(out / "grids" / name)
                if copied:
                    grids[f"{r.name} ({label})"] = copied
        in_tmp = {k: tmp / p.relative_to(out) for k, p in figures.items()}
        grids_tmp = {k: [tmp / p.relative_to(out) for p in ps] for k, ps in grids.items()}
        atomic_write_json(tmp / "summary.json", rows)
        (tmp / "report.md").write_text(_markdown(title, rows, figures, grids, out, problems))
        (tmp / "report.html").write_text(_html(title, rows, in_tmp, grids_tmp, problems))
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Report(out / "report.html", out / "report.md", out / "summary.json", rows, figures, grids)


__all__ = ["Report", "build_report", "find_runs", "md_escape", "table_cells"]
