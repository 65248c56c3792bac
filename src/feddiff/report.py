"""Reports read run folders only; they never retrain.

``summarize_run`` turns one run folder into a flat row (method, partition, clients, final losses,
image-quality metrics with their protocol label, bytes per direction); ``compare`` adds each row's
communication savings against the FedAvg (FULL) run with the same data split, clients and seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
    for key in ("heldout_loss", "fd", "kid_mean", "is_mean"):
        if key in ev:
            row[key] = ev[key]
        if f"{key}_mean" in ev:  # personal models: mean and spread over clients
            row[key] = ev[f"{key}_mean"]
            row[f"{key}_std"] = ev[f"{key}_std"]
    if "label" in ev:
        row["fd_label"] = ev["label"]
    return row


def compare(rows: list[dict[str, Any]], baseline: str = "fedavg") -> list[dict[str, Any]]:
    """Add ``savings`` = 1 - bytes / bytes of the baseline run with the same split, clients, seed."""
    base = {(r["split"], r["clients"], r["seed"]): r for r in rows if r["algorithm"] == baseline}
    for r in rows:
        b = base.get((r["split"], r["clients"], r["seed"]))
        if b and b["bytes_total"]:
            r["savings"] = 1 - r["bytes_total"] / b["bytes_total"]
    return rows


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def table(rows: Iterable[dict[str, Any]], title: str) -> Table:
    rows = list(rows)
    t = Table(title=title)
    fd_label = next((r["fd_label"] for r in rows if "fd_label" in r), "FD")
    cols = ["algorithm", "split", "clients", "rounds", "heldout loss", fd_label, "MB total", "savings vs FULL"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("algorithm", "split") else "right")
    for r in rows:
        def pm(key: str, spec: str) -> str:
            if key not in r:
                return "-"
            s = _fmt(r[key], spec)
            return s + (f" ± {_fmt(r[key + '_std'], spec)}" if f"{key}_std" in r else "")

        t.add_row(r["algorithm"], r["split"], str(r["clients"]), str(r["rounds"]), pm("heldout_loss", ".4f"),
                  pm("fd", ".2f"), f"{r['bytes_total'] / 1e6:.1f}",
                  f"{100 * r['savings']:.1f}%" if "savings" in r else "-")
    return t
