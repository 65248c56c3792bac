"""The one check every reply passes before aggregation: pure, no I/O, no engine types.

A reply that fails it is a rejection (client, reason) recorded in ``metrics.jsonl``; it never reaches
a strategy, so the global model is unchanged by it.
"""

from __future__ import annotations

import torch

from feddiff.algorithms.base import Reply
from feddiff.types import StateDict

MAX_CLAIMED_SAMPLES = 10**9  # a bound on what a client of unknown size may claim


def validate_reply(
    reply: Reply, expected: StateDict, known_samples: int | None = None,
) -> str | None:
    """Why ``reply`` cannot be aggregated, or None when it can.

    Parameters
    ----------
    reply
        The decoded reply.
    expected
        The model tensors a valid reply carries, by name, with the shapes and dtypes the server holds.
    known_samples
        The client's sample count when the engine knows it (the partition); the reply's claim is then
        recorded but not used. Otherwise the claim must be an integer in [1, MAX_CLAIMED_SAMPLES].
    """
    missing = sorted(set(expected) - set(reply.tensors))
    extra = sorted(set(reply.tensors) - set(expected))
    if missing or extra:
        parts = ([f"missing {len(missing)} tensors (e.g. {missing[:3]})"] if missing else []) + (
            [f"{len(extra)} unexpected tensors (e.g. {extra[:3]})"] if extra else [])
        return "; ".join(parts)
    for k, v in reply.tensors.items():
        want = expected[k]
        if tuple(v.shape) != tuple(want.shape):
            return f"{k}: shape {list(v.shape)}, expected {list(want.shape)}"
        if v.dtype != want.dtype:
            return f"{k}: dtype {v.dtype}, expected {want.dtype}"
    for section, tensors in (("", reply.tensors), ("extra ", reply.extras)):
        for k, v in tensors.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"{section}{k}: non-finite values (NaN or Inf)"
    n = reply.claimed_samples if reply.claimed_samples is not None else reply.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CLAIMED_SAMPLES:
        return f"num_samples {n!r} is not an integer in [1, {MAX_CLAIMED_SAMPLES}]"
    if known_samples is None and n > MAX_CLAIMED_SAMPLES:
        return f"num_samples {n} exceeds {MAX_CLAIMED_SAMPLES}"
    return None
