"""The one check every reply passes before aggregation: pure, no I/O, no engine types.

A reply that fails it is a rejection (client, reason) recorded in ``metrics.jsonl``; it never reaches
a strategy, so the global model is unchanged by it.
"""

from __future__ import annotations

import torch

from feddiff.algorithms.base import Reply
from feddiff.types import StateDict

MAX_CLAIMED_SAMPLES = 10**9  # a bound on what a client of unknown size may claim
# keys of a client's row in metrics.jsonl that the server writes: a reply's metrics may not take them
RESERVED_METRICS = frozenset({"id", "num_samples", "claimed_samples", "bytes_down", "bytes_up"})


def check_metrics(metrics: dict) -> str | None:
    """Why a reply's training metrics are unusable: each a finite number, ``loss`` present, no reserved name."""
    if "loss" not in metrics:
        return "metrics: no 'loss'"
    for k, v in metrics.items():
        if not isinstance(k, str) or k in RESERVED_METRICS:
            return f"metrics: the name {k!r} is not allowed (reserved: {sorted(RESERVED_METRICS)})"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            return f"metrics: {k} = {v!r} is not a finite number"
    return None


def _check_tensors(section: str, got: StateDict, expected: StateDict) -> str | None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        parts = ([f"missing {len(missing)} {section}tensors (e.g. {missing[:3]})"] if missing else []) + (
            [f"{len(extra)} unexpected {section}tensors (e.g. {extra[:3]})"] if extra else [])
        return "; ".join(parts)
    for k, v in got.items():
        want = expected[k]
        if tuple(v.shape) != tuple(want.shape):
            return f"{section}{k}: shape {list(v.shape)}, expected {list(want.shape)}"
        if v.dtype != want.dtype:
            return f"{section}{k}: dtype {v.dtype}, expected {want.dtype}"
    return None


def validate_reply(
    reply: Reply, expected: StateDict, known_samples: int | None = None, expected_extras: StateDict | None = None,
) -> str | None:
    """Why ``reply`` cannot be aggregated, or None when it can.

    Parameters
    ----------
    reply
        The decoded reply.
    expected
        The model tensors a valid reply carries, by name, with the shapes and dtypes the server holds.
    known_samples
        The client's sample count when the engine knows it (the partition); it, not the claim, is then the
        aggregation weight. Either way the claim must be an integer in [1, MAX_CLAIMED_SAMPLES].
    expected_extras
        The extras a valid reply carries (names, shapes, dtypes); None: extras are not checked but must
        be finite.
    """
    reason = _check_tensors("", reply.tensors, expected)
    if reason is None and expected_extras is not None:
        reason = _check_tensors("extra ", reply.extras, expected_extras)
    if reason is not None:
        return reason
    for section, tensors in (("", reply.tensors), ("extra ", reply.extras)):
        for k, v in tensors.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"{section}{k}: non-finite values (NaN or Inf)"
    reason = check_metrics(reply.metrics)
    if reason is not None:
        return reason
    n = reply.claimed_samples if reply.claimed_samples is not None else reply.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CLAIMED_SAMPLES:
        return f"num_samples {n!r} is not an integer in [1, {MAX_CLAIMED_SAMPLES}]"
    return None
