"""Reports read run folders only; they never retrain.

``summarize_run`` turns one run folder into a flat row (method, partition, clients, final losses,
image-quality metrics with their protocol label, bytes per direction); ``compare`` adds each row's
communication savings against the FedAvg (FULL) run with the same data split, clients and seed (and,
among several, the one with the same other sweep settings).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from feddiff.runs import RunDir


def _final_eval(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    for m in reversed(metrics):
        if "eval" in m:
            return m["eval"]
    return {}


def summarize_run(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """One flat row describing a finished (or partial) run."""
    rd = RunDir.open(path)
    cfg = json.loads(rd.config_path.read_text())
    metrics = rd.read_metrics()
    last = metrics[-1] if metrics else {}
    ev = _final_eval(metrics)
    part = cfg["partition"]
    split = {"iid": "iid", "dirichlet": f"label-skew({part['alpha']})", "quantity": f"quantity-skew({part['alpha']})",
             "pathological": f"{part['classes_per_client']}-class"}[part["method"]]
    row: dict[str, Any] = {
        "name": name or rd.path.name,
        "algorithm": cfg["algorithm"]["name"],
        "split": split,
        "clients": part["num_clients"],
        "seed": cfg["run"]["seed"],
        "rounds": last.get("round", 0),
        "train_loss": last.get("loss"),
        # training traffic: every link but the one-off evaluation statistics
        "bytes_total": sum(sum(d.values()) for link, d in last.get("bytes_cumulative", {}).items() if link != "eval"),
        "bytes": last.get("bytes_cumulative", {}),
        "wall_s": last.get("elapsed_s"),
    }
    cost = next((r["model_cost"] for r in reversed(metrics) if "model_cost" in r), None)
    if cost is not None:  # the final architecture's size (pruned runs record it again when it changes)
        row["parameters"], row["macs"] = cost["parameters"], cost["macs"]
    for key in ("heldout_loss", "fd", "kid_mean", "is_mean"):
        if key in ev:
            row[key] = ev[key]
        if f"{key}_mean" in ev:  # personal models: mean and spread over clients
            row[key] = ev[f"{key}_mean"]
            row[f"{key}_std"] = ev[f"{key}_std"]
    if "label" in ev:
        row["fd_label"] = ev["label"]
    return row


def compare(rows: list[dict[str, Any]], baseline: str = "fedavg",
            settings: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Add ``savings`` = 1 - bytes / bytes of the baseline run with the same split, clients, seed, and
    ``baseline`` = that run's name.

    When a group holds several baseline runs (a grid over, say, ``train.lr``), the baseline of a row is
    the one whose ``settings`` (row name -> ``{dotted key: value}``, e.g. a sweep point's overrides)
    match the row's on every key outside ``algorithm.*`` (a key set on one side only is a mismatch);
    failing an exact match, the one matching on the most such keys, the first in row order on a tie
    (without ``settings``: the group's first).
    """
    settings = settings or {}
    unset = object()

    def same(r: dict[str, Any], b: dict[str, Any]) -> int:  # keys on which b's settings match r's
        mine, theirs = settings.get(r["name"], {}), settings.get(b["name"], {})
        keys = {k for k in (*mine, *theirs) if not k.startswith("algorithm.")}
        return sum(mine.get(k, unset) == theirs.get(k, unset) for k in keys)

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r["algorithm"] == baseline:
            groups.setdefault((r["split"], r["clients"], r["seed"]), []).append(r)
    for r in rows:
        candidates = groups.get((r["split"], r["clients"], r["seed"]), [])
        if not candidates:
            continue
        b = max(candidates, key=lambda c: same(r, c))  # max keeps the first of equals
        if b["bytes_total"]:
            r["savings"] = 1 - r["bytes_total"] / b["bytes_total"]
            r["baseline"] = b["name"]
    return rows


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
