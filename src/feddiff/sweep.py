"""Grids of runs: ``feddiff sweep CONFIG`` runs every point of the config's ``[sweep]`` grid.

A sweep folder holds ``sweep.json`` (the points and their overrides) and one run folder per
point. Re-running with ``--resume`` skips finished points, resumes interrupted ones from their
checkpoints and starts the rest, so a sweep killed at any moment loses at most one round.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feddiff.config import Config, ConfigError, load_config
from feddiff.runs import RunDir, RunError, atomic_write_json


@dataclass
class Point:
    name: str
    overrides: list[str]


def _short(key: str, value: Any) -> str:
    parts = key.split(".")
    label = parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
    return f"{label}={value}"


def expand(cfg: Config) -> list[Point]:
    """The grid's points in file order (the last key varies fastest), each variant, ``repeats`` seeds."""
    grid = cfg.sweep.grid
    keys = list(grid)
    variants = list(cfg.sweep.variants.items()) or [("", [])]
    points = []
    for values, (variant, extra) in itertools.product(itertools.product(*(grid[k] for k in keys)), variants):
        for rep in range(cfg.sweep.repeats):
            overrides = [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)] + list(extra)
            name = "_".join([*(_short(k, v) for k, v in zip(keys, values)), *([variant] if variant else [])]) or "base"
            if cfg.sweep.repeats > 1:
                overrides.append(f"run.seed={cfg.run.seed + rep}")
                name += f"_seed={cfg.run.seed + rep}"
            points.append(Point(name, overrides))
    return points


def point_config(config_path: str, base_overrides: list[str], point: Point) -> Config:
    try:
        return load_config(config_path, [*base_overrides, *point.overrides])
    except ConfigError as err:
        raise ConfigError(f"sweep point {point.name!r}: {err}") from None


def _status(path: Path, num_rounds: int) -> str:
    if not (path / "config.json").exists():
        return "new"
    rd = RunDir(path)
    rounds = [m.get("round", 0) for m in rd.read_metrics()]
    if rounds and max(rounds) >= num_rounds and (path / "checkpoints").exists() and rd.checkpoints():
        return "done"
    return "resume" if rd.checkpoints() else "restart"


def run_sweep(config_path: str, overrides: list[str] = (), out_dir: str | None = None,
              resume_dir: str | None = None) -> Path:
    """Run a sweep, or continue the one in ``resume_dir`` (then ``config_path`` and ``overrides`` are
    read from its sweep.json); returns the sweep folder."""
    from feddiff.engines.simulator import resume as resume_run
    from feddiff.engines.simulator import run as run_one

    if resume_dir:
        folder = Path(resume_dir)
        if not (folder / "sweep.json").is_file():
            raise RunError(f"{folder} is not a sweep folder (no sweep.json)")
        spec = json.loads((folder / "sweep.json").read_text())
        config_path, overrides = spec["config"], spec["overrides"]
        points = [Point(p["name"], p["overrides"]) for p in spec["points"]]
    else:
        base = load_config(config_path, overrides)
        points = expand(base)
        configs = [point_config(config_path, list(overrides), p) for p in points]  # validate all first
        del configs
        root = Path(out_dir or base.run.out_dir)
        folder = root / f"{base.run.name or 'sweep'}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir(parents=True)
        atomic_write_json(folder / "sweep.json", {
            "config": str(config_path), "overrides": list(overrides),
            "points": [{"name": p.name, "overrides": p.overrides} for p in points],
        })
    for i, p in enumerate(points):
        cfg = point_config(config_path, list(overrides), p)
        path = folder / p.name
        status = _status(path, cfg.run.num_rounds)
        print(f"[{i + 1}/{len(points)}] {p.name}: {status}", flush=True)
        if status == "done":
            continue
        if status == "resume":
            resume_run(path)
            continue
        if status == "restart":  # interrupted before its first checkpoint: keep it aside, start again
            path.rename(path.with_name(f"{p.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"))
        run_one(cfg, run_path=path)
    return folder


def sweep_runs(folder: Path) -> list[tuple[str, list[str], Path]]:
    spec = json.loads((folder / "sweep.json").read_text())
    return [(p["name"], p["overrides"], folder / p["name"]) for p in spec["points"]]
