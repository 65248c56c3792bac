"""Grids of runs: ``feddiff sweep CONFIG`` runs every point of the config's ``[sweep]`` grid.

A sweep folder holds ``sweep.json`` (the base config's tables, the base overrides, and the points
with their overrides) and one run folder per point. Re-running with ``--resume`` skips finished
points (their final checkpoint and exported model are on disk and readable), resumes interrupted
ones from their checkpoints and starts the rest, so a sweep killed at any moment loses at most one
round. A resume needs neither the original TOML file nor the folder the sweep was started from: the
config is rebuilt from what sweep.json saved.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from feddiff.config import Config, ConfigError, config_from_tables, parse_override, read_toml
from feddiff.runs import RunDir, RunError, atomic_write_json

# the override key that holds a point's data split fixed across repeats
_PARTITION_SEED = ["partition", "seed"]

# files a sweep folder holds next to its run folders: no point may take their names
_RESERVED = {"sweep.json", "summary.json"}
_MAX_NAME = 150


@dataclass
class Point:
    name: str
    overrides: list[str]


def _short(key: str, value: Any) -> str:
    parts = key.split(".")
    label = parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
    shown = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)
    return f"{label}={shown}"


def safe_name(name: str) -> str:
    """``name`` as one folder name: path separators, spaces and other characters that are unsafe in
    file names become ``-``, a leading dot is dropped, and long names are cut (with a hash of the
    whole). Names of letters, digits and ``._,=+-@%[]`` are kept as they are."""
    s = re.sub(r"[^\w.,=+@%\[\]-]+", "-", name)
    s = re.sub(r"^\.+", "", s) or "point"
    if len(s) > _MAX_NAME:
        s = s[: _MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return s


def _unique(names: list[str]) -> list[str]:
    """Safe, distinct folder names (case-insensitively, for macOS and Windows file systems)."""
    taken = set(_RESERVED)
    out = []
    for name in names:
        base = candidate = safe_name(name)
        n = 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def check_grid(cfg: Config, source: str = "the config") -> None:
    """The sweep has points, and no grid key has an empty list of values."""
    if not cfg.sweep.grid and not cfg.sweep.variants:
        raise ConfigError(f"{source} has no [sweep.grid] or [sweep.variants]; add e.g. "
                          "\"algorithm.name\" = [\"fedavg\", \"udec\"] under [sweep.grid]")
    for key, values in cfg.sweep.grid.items():
        if not values:
            raise ConfigError(f"sweep.grid key {key!r} has an empty list of values; give at least one value "
                              "(or remove the key)")


def _sets(overrides: list[str], key: list[str]) -> bool:
    return any(parse_override(text)[0] == key for text in overrides)


def expand(cfg: Config) -> list[Point]:
    """The points of a sweep.

    Parameters
    ----------
    cfg : Config
        The base config; its ``sweep`` section gives the grid, the variants and ``repeats``.

    Returns
    -------
    list of Point
        The grid's points in file order (the last key varies fastest), each variant, ``repeats``
        seeds. Names are folder-safe and distinct (see ``safe_name``). With ``repeats`` > 1 the
        repeats set ``run.seed`` to ``run.seed + i`` and keep the data split: where neither the base
        config nor the point sets ``partition.seed``, each repeat sets it to the base ``run.seed``,
        so the spread of the repeats is training variance, not data-split variance.
    """
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
                if cfg.partition.seed is None and not _sets(overrides, _PARTITION_SEED):
                    overrides.append(f"partition.seed={cfg.run.seed}")
                name += f"_seed={cfg.run.seed + rep}"
            points.append(Point(name, overrides))
    for p, name in zip(points, _unique([p.name for p in points])):
        p.name = name
    return points


def point_config(base: str | Path | dict[str, Any], base_overrides: list[str], point: Point,
                 source: str = "sweep.json") -> Config:
    """One point's config from the base config (a TOML path, or tables from ``read_toml``)."""
    try:
        tables = base if isinstance(base, dict) else read_toml(base)
        return config_from_tables(tables, [*base_overrides, *point.overrides], source)
    except ConfigError as err:
        raise ConfigError(f"sweep point {point.name!r}: {err}") from None


def plan(config_path: str | Path,
         overrides: list[str] = ()) -> tuple[Config, dict[str, Any], list[Point], list[Config]]:
    """Read and check a sweep before anything runs or is listed: the base config, its tables (for
    sweep.json), the points and every point's validated config."""
    base_raw = read_toml(config_path)
    try:
        json.dumps(base_raw)
    except (TypeError, ValueError) as err:  # TOML dates and times have no JSON form
        raise ConfigError(f"{config_path}: a sweep config may hold no TOML dates or times ({err})") from None
    base = config_from_tables(base_raw, list(overrides), str(config_path))
    check_grid(base, str(config_path))
    points = expand(base)
    configs = [point_config(base_raw, list(overrides), p, str(config_path)) for p in points]
    return base, base_raw, points, configs


def read_spec(folder: str | Path) -> dict[str, Any]:
    """A sweep folder's sweep.json."""
    path = Path(folder) / "sweep.json"
    if not path.is_file():
        raise RunError(f"{folder} is not a sweep folder (no sweep.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON ({err}); it is not a sweep folder feddiff can read") from None


def _readable_safetensors(path: Path) -> dict[str, str] | None:
    """The metadata of a complete safetensors file (its header covers the whole file), else None."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except Exception:  # safetensors raises its own error types
        return None


def _readable_checkpoint(path: Path, rnd: int) -> bool:
    try:  # its size and CRC-32 first: a flipped bit is a damaged checkpoint, not a resumable one
        RunDir(path.parent.parent).verify_checkpoint(path)
    except RunError:
        return False
    meta = _readable_safetensors(path)
    try:
        return meta is not None and int(meta["round"]) == rnd and isinstance(json.loads(meta["state"]), dict)
    except (KeyError, ValueError):
        return False


def _readable_export(path: Path) -> bool:
    """An exported pipeline folder whose JSON files parse and whose weight files are complete."""
    if not (path / "model_index.json").is_file():
        return False
    weights = list(path.rglob("*.safetensors"))
    try:
        for f in path.rglob("*.json"):
            json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return bool(weights) and all(_readable_safetensors(w) is not None for w in weights)


def _exports(record: dict[str, Any]) -> list[str]:
    """The exported models the record of a run's last round names (one per model it evaluated)."""
    ev = record.get("eval") or {}
    if "models" in ev:
        return [m["model"] for m in ev["models"].values() if isinstance(m, dict) and "model" in m]
    return [ev["model"]] if "model" in ev else []


def _status(path: Path, num_rounds: int) -> str:
    """What a point's run folder needs: "new", "done", "resume", "redo-last" or "restart".

    "done" means the run finished: the record of its last round, its final checkpoint and the
    exported model(s) that record names are on disk, and the files are complete. The simulator
    writes the export, then the last metrics line, then the final checkpoint, so a run killed
    between them has a last metrics line but is not done. "redo-last": the final checkpoint is there
    but the export is not (a resume cannot redo it from that checkpoint); "resume": some checkpoint
    is readable; "restart": none is.
    """
    if not (path / "config.json").exists():
        return "new"
    rd = RunDir(path)
    ckpts = rd.checkpoints() if (path / "checkpoints").is_dir() else []
    finals = [(rnd, p) for rnd, p in ckpts if rnd >= num_rounds]
    if finals and _readable_checkpoint(finals[-1][1], finals[-1][0]):
        last = [m for m in rd.read_metrics() if m.get("round", 0) == finals[-1][0]]
        exports = _exports(last[-1]) if last else []
        if exports and all(_readable_export(path / e) for e in exports):
            return "done"
        return "redo-last"
    return "resume" if any(_readable_checkpoint(p, rnd) for rnd, p in ckpts) else "restart"


def _set_aside_finals(path: Path, num_rounds: int) -> None:
    """Rename the checkpoints of the last round (and later) out of the resume path; kept, not deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for rnd, ckpt in RunDir(path).checkpoints():
        if rnd >= num_rounds:
            for f in (ckpt, ckpt.with_suffix(".json")):
                if f.exists():
                    f.rename(f.with_name(f"{f.name}.no-export-{stamp}"))


def run_sweep(config_path: str, overrides: list[str] = (), out_dir: str | None = None,
              resume_dir: str | None = None) -> Path:
    """Run a sweep, or continue the one in ``resume_dir``.

    Each point is skipped when done (its final checkpoint and exported model are on disk and
    readable), resumed from its newest readable checkpoint, or started (again).

    Parameters
    ----------
    config_path : str
        The sweep's TOML config; not used with ``resume_dir``.
    overrides : list of str
        ``section.key=value`` overrides of the base config; not used with ``resume_dir``.
    out_dir : str, optional
        Folder to create the sweep folder in (default ``run.out_dir``); not used with ``resume_dir``.
    resume_dir : str, optional
        A sweep folder to continue; its base config and overrides come from its sweep.json.

    Returns
    -------
    Path
        The sweep folder.
    """
    from feddiff.engines.runner import resume as resume_run
    from feddiff.engines.runner import run as run_one

    if resume_dir:
        folder = Path(resume_dir)
        spec = read_spec(folder)
        overrides = spec["overrides"]
        points = [Point(p["name"], p["overrides"]) for p in spec["points"]]
        if "base" in spec:
            base: str | dict[str, Any] = spec["base"]
        else:  # sweep.json of an older feddiff: only the config path as it was given
            base = spec["config"]
            if not Path(base).is_file():
                raise RunError(f"{folder / 'sweep.json'} (from an older feddiff) names the config {base!r} only, "
                               f"and it is not found from {Path.cwd()}; resume from the folder the sweep "
                               "was started in")
        source = f"{spec.get('config', 'config')} as saved in {folder / 'sweep.json'}"
        configs = [point_config(base, list(overrides), p, source) for p in points]  # validate all first
    else:
        base_cfg, base, points, configs = plan(config_path, overrides)
        root = Path(out_dir or base_cfg.run.out_dir)
        folder = root / f"{base_cfg.run.name or 'sweep'}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir(parents=True)
        atomic_write_json(folder / "sweep.json", {
            "config": str(config_path), "base": base, "overrides": list(overrides),
            "points": [{"name": p.name, "overrides": p.overrides} for p in points],
        })
    for i, (p, cfg) in enumerate(zip(points, configs)):
        path = folder / p.name
        status = _status(path, cfg.run.num_rounds)
        note = ""
        if status == "redo-last":  # its final checkpoint stays aside; the last round is trained again
            _set_aside_finals(path, cfg.run.num_rounds)
            status = _status(path, cfg.run.num_rounds)
            note = " (the final checkpoint has no complete exported model: the last round is redone)"
        print(f"[{i + 1}/{len(points)}] {p.name}: {status}{note}", flush=True)
        if status == "done":
            continue
        if status == "resume":
            resume_run(path)
            continue
        if status == "restart":  # interrupted before its first checkpoint: keep it aside, start again
            path.rename(path.with_name(f"{p.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"))
        run_one(cfg, run_path=path)
    return folder


def sweep_runs(folder: str | Path) -> list[tuple[str, list[str], Path]]:
    """(name, overrides, run folder) of every point of a sweep folder, in sweep order."""
    folder = Path(folder)
    spec = read_spec(folder)
    return [(p["name"], p["overrides"], folder / p["name"]) for p in spec["points"]]


def point_settings(overrides: list[str]) -> dict[str, Any]:
    """A point's overrides as ``{dotted key: value}`` (what ``report.compare`` matches baselines on)."""
    settings = {}
    for text in overrides:
        key, value = parse_override(text)
        settings[".".join(key)] = value
    return settings
