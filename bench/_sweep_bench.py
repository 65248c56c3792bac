"""Shared command line of the benches that run a ``feddiff sweep`` (resumable, with ``--quick``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from feddiff.report import summarize_run
from feddiff.sweep import run_sweep, sweep_runs


def run_bench_sweep(doc: str, config: Path, overrides: Callable[[bool], list[str]]) -> tuple[Path, bool]:
    """Parse ``--quick/--out/--resume``, run (or resume) the sweep; return its folder and whether quick."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 30 s with a cached feature net)")
    ap.add_argument("--out", default="runs/bench", help="folder for the sweep folder (default runs/bench)")
    ap.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted bench")
    args = ap.parse_args()
    folder = run_sweep(str(config), overrides(args.quick), args.out, resume_dir=args.resume)
    return Path(folder), args.quick


def variant_rows(folder: Path) -> dict[str, dict]:
    """One summary row per sweep point, keyed by its variant name (the part after the last ``_``)."""
    return {name.rsplit("_", 1)[-1] if "_" in name else name: summarize_run(path, name)
            for name, _, path in sweep_runs(folder)}
