"""The run folder: created once, appended to, checkpointed atomically; reports only read it.

Layout::

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.json          the resolved config (what --resume reads)
      manifest.json        versions, seed, partition hash, model size
      partition.json       per-client indices and label histograms
      metrics.jsonl        one JSON line per round
      samples/             sample grids (round-0004.png, final.png)
      checkpoints/         round-0004.safetensors (+ the JSON round state inside)
      model/               the final model: DDPMPipeline.from_pretrained(<this folder>); a pruned one
                           (unet/feddiff_spec.json): feddiff.model.export.load_pipeline(<this folder>)
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save as st_save

from feddiff.compress.crc import crc32_of
from feddiff.types import StateDict

_CKPT = re.compile(r"round-(\d+)\.safetensors$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class RunError(RuntimeError):
    """A run folder is missing, incomplete or inconsistent."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some file systems refuse fsync on folders
        pass


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


class RunDir:
    """A run folder on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- creation and opening --------------------------------------------------------------
    @classmethod
    def create(cls, out_dir: str | Path, name: str) -> RunDir:
        """A new, uniquely named folder ``<out_dir>/<name>-<timestamp>[-n]``."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise RunError(f"the output folder {out} is a file, not a folder; choose another --out / run.out_dir")
        out.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
        base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1000):
            try:
                return cls.create_at(out / (base if n == 0 else f"{base}-{n}"))
            except FileExistsError:
                continue
        raise RunError(f"could not create a unique run folder under {out}")

    @classmethod
    def create_at(cls, path: str | Path) -> RunDir:
        """A new run folder at exactly ``path`` (FileExistsError if it exists)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        (path / "samples").mkdir()
        (path / "checkpoints").mkdir()
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        p = Path(path)
        if not (p / "config.json").is_file():
            raise RunError(f"{p} is not a run folder (no config.json)")
        return cls(p)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_path(self) -> Path:
        return self.path / "model"

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        atomic_write_json(path, obj)
        return path

    def engine(self) -> str:
        """The engine that trained the run (``manifest.json``; a run without one is a simulator run)."""
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            return "simulator"
        try:
            return str(json.loads(manifest.read_text()).get("engine", "simulator"))
        except (OSError, ValueError, AttributeError) as err:
            raise RunError(f"cannot read {manifest} ({err}); it records which engine trained the run. If it is "
                           "damaged, restore it or remove it to treat the run as a simulator run") from None

    def phase_rounds(self, name: str) -> int | None:
        """The ``rounds`` an end-of-run phase's record (``personalize.json``, ``audit.json``) was made after;
        None when there is no readable record."""
        try:
            rounds = json.loads((self.path / name).read_text()).get("rounds")
        except (OSError, ValueError, AttributeError):
            return None
        return rounds if isinstance(rounds, int) else None

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    # -- metrics ---------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash: ignore it
                    continue
        return out

    def truncate_metrics(self, last_round: int) -> None:
        """Keep records of rounds <= ``last_round`` (a resume redoes the later ones)."""
        kept = [r for r in self.read_metrics() if r.get("round", -1) <= last_round]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    # -- checkpoints -----------------------------------------------------------------------
    def clean_stale_temps(self) -> list[Path]:
        """Remove half-written temp files (``.<name>.tmp-<pid>``) that a killed process left; returns them.

        A file of a process that still runs is kept (it may be writing it now).
        """
        removed = []
        for folder in (self.path, self.path / "checkpoints"):
            for p in folder.glob(".*.tmp-*"):
                pid = p.name.rsplit(".tmp-", 1)[-1]
                if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                    continue
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(round, path) of complete checkpoints, oldest first."""
        found = []
        for p in (self.path / "checkpoints").glob("round-*.safetensors"):
            m = _CKPT.search(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save_checkpoint(self, rnd: int, tensors: StateDict, state: dict[str, Any], keep: int = 2) -> Path:
        """Write the state after round ``rnd`` atomically; older checkpoints beyond ``keep`` go."""
        path = self.path / "checkpoints" / f"round-{rnd:05d}.safetensors"
        # safetensors sorts tensors by name; the order is kept so a resumed run sends identical messages
        blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                       metadata={"round": str(rnd), "state": json.dumps(state), "order": json.dumps(list(tensors))})
        # Beside it: the file's size and CRC-32 (verified on load), with the round state again for people
        # and tools (the copy inside the .safetensors is what resumes). Written first, so a checkpoint
        # file never exists without its checksum; a kill between the two leaves only the JSON, which
        # is no checkpoint and is overwritten when that round is saved again.
        atomic_write_json(path.with_suffix(".json"), {"round": rnd, "file_bytes": len(blob),
                                                      "file_crc32": crc32_of([blob]), **state})
        atomic_write_bytes(path, blob)
        for _, old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        return path

    def verify_checkpoint(self, path: Path) -> None:
        """Check a checkpoint file against the size and CRC-32 stored beside it; raises :class:`RunError`.

        A checkpoint without the JSON beside it (written by feddiff before checksums) passes unverified.
        """
        side = path.with_suffix(".json")
        if not side.exists():  # feddiff writes it first: only an older feddiff's checkpoint lacks it
            warnings.warn(f"checkpoint {path} has no {side.name} beside it (size and CRC-32): loading it unverified",
                          stacklevel=2)
            return
        try:
            meta = json.loads(side.read_text())
            size, crc = meta.get("file_bytes"), meta.get("file_crc32")
        except (OSError, ValueError, AttributeError) as err:
            raise RunError(f"checkpoint {path} cannot be verified: its checksum file {side.name} is damaged "
                           f"({err})") from None
        if size is None or crc is None:
            return  # an older feddiff's JSON: no checksum was stored
        actual = path.stat().st_size
        if actual != size:
            raise RunError(f"checkpoint {path} is damaged: {actual} bytes, but {size} were written "
                           f"(size and checksum in {side.name})")
        got = 0
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                got = zlib.crc32(chunk, got)
        if got != crc:
            raise RunError(f"checkpoint {path} is damaged: its contents do not match the CRC-32 written beside "
                           f"it in {side.name} ({got:08x} != {crc:08x})")

    def load_checkpoint(self, path: Path) -> tuple[int, StateDict, dict[str, Any]]:
        """(round, tensors, state) of one checkpoint file, verified against its checksum first."""
        self.verify_checkpoint(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata()
                order = json.loads(meta["order"]) if "order" in meta else list(fh.keys())
                tensors = {k: fh.get_tensor(k) for k in order}
            return int(meta["round"]), tensors, json.loads(meta["state"])
        except Exception as err:  # safetensors raises its own error types
            raise RunError(f"checkpoint {path} is unreadable: {err}") from None

    def latest_checkpoint(self, damaged: list[tuple[Path, str]] | None = None
                          ) -> tuple[int, StateDict, dict[str, Any]] | None:
        """The newest readable checkpoint (a damaged newest one falls back to the one before).

        Each damaged checkpoint passed over is appended to ``damaged`` as (path, reason).
        """
        for _, path in reversed(self.checkpoints()):
            try:
                return self.load_checkpoint(path)
            except RunError as err:
                if damaged is not None:
                    damaged.append((path, str(err)))
        return None

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint (and its JSON) to ``*.damaged``, out of the resume path; kept, not deleted."""
        suffix, n = ".damaged", 1
        while path.with_name(path.name + suffix).exists():  # an earlier damaged copy stays too
            n += 1
            suffix = f".damaged{n}"
        kept = path.with_name(path.name + suffix)
        path.replace(kept)
        meta = path.with_suffix(".json")
        if meta.exists():
            meta.replace(meta.with_name(meta.name + suffix))
        return kept
