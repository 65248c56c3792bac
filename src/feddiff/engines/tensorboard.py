"""TensorBoard scalars of a run (``run.tensorboard = true``), the same numbers as ``metrics.jsonl``.

Written to ``RUN_DIR/tensorboard`` with ``torch.utils.tensorboard`` (needs the ``tensorboard``
package: ``pip install 'feddiff[tensorboard]'``), one step per round, flushed every round. A resumed
run purges the steps after its checkpoint, as ``metrics.jsonl`` is cut there.

    tensorboard --logdir runs/    # every run side by side
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from feddiff.metrics.ledger import training_bytes

EVAL_KEYS = ("fd", "heldout_loss", "kid_mean", "is_mean")
MISSING = ("run.tensorboard = true needs the tensorboard package, which is not installed here; install it with "
           "pip install 'feddiff[tensorboard]' (or --set run.tensorboard=false, also on --resume)")


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """Tag -> value for one round's metrics record (only finite numbers)."""
    out: dict[str, float] = {}
    if isinstance(record.get("loss"), (int, float)):
        out["train/loss"] = record["loss"]
    ev = record.get("eval", {})
    for key in EVAL_KEYS:  # the global model's, or the mean over personal models
        value = ev.get(key, ev.get(f"{key}_mean"))
        if isinstance(value, (int, float)):
            out[f"eval/{ev.get('label', 'FD') if key == 'fd' else key}"] = value
    for link, d in record.get("bytes_cumulative", {}).items():
        for direction in ("up", "down"):
            out[f"bytes_cumulative/{link}/{direction}"] = d.get(direction, 0)
    out["bytes_cumulative/training"] = sum(training_bytes(record.get("bytes_cumulative", {})).values())
    if "round" in record.get("time_s", {}):
        out["time/round_s"] = record["time_s"]["round"]
    return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


class ScalarWriter:
    """One SummaryWriter for the run folder; ``add(record)`` logs a round."""

    def __init__(self, run_path: Path, start_round: int):
        if not available():
            from feddiff.config import ConfigError

            raise ConfigError(MISSING)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of rounds after the checkpoint a resume starts from are dropped
        self.writer = SummaryWriter(str(run_path / "tensorboard"), purge_step=start_round + 1 if start_round else None)

    def add(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
