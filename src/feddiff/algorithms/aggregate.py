"""Pure aggregation math over state dicts: no I/O, no engine types (cf. Flower's aggregate.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from feddiff.types import StateDict, clone_state  # noqa: F401 - clone_state re-exported


class AggregationError(ValueError):
    """Replies that cannot be combined (no replies, mismatched keys or shapes, bad weights)."""


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum; they must be finite, non-negative, with a positive sum."""
    w = [float(x) for x in weights]
    if not w:
        raise AggregationError("nothing to aggregate: no replies")
    if any(x < 0 or x != x or x == float("inf") for x in w):
        raise AggregationError(f"aggregation weights must be finite and >= 0, got {w}")
    total = sum(w)
    if total <= 0:
        raise AggregationError(f"aggregation weights sum to {total}; at least one must be > 0")
    return [x / total for x in w]


def weighted_mean(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_i (w_i / sum_j w_j) * state_i, key by key, in the tensors' own floating dtype.

    Non-floating tensors (counters) must agree across states and are taken as they are.
    """
    if len(states) != len(weights):
        raise AggregationError(f"{len(states)} states but {len(weights)} weights")
    w = normalized_weights(weights)
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if s.keys() != states[0].keys():
            diff = sorted(set(s) ^ set(states[0]))[:5]
            raise AggregationError(f"reply {i} has different tensors than reply 0 (e.g. {diff})")
    out: StateDict = {}
    for k in keys:
        first = states[0][k]
        for i, s in enumerate(states[1:], 1):
            if s[k].shape != first.shape:
                raise AggregationError(f"{k}: reply {i} has shape {list(s[k].shape)}, reply 0 {list(first.shape)}")
        if not first.is_floating_point():
            if any(not torch.equal(s[k], first) for s in states[1:]):
                raise AggregationError(f"{k}: non-floating tensor differs across replies")
            out[k] = first.clone()
            continue
        acc = torch.mul(first, w[0])
        for wi, s in zip(w[1:], states[1:]):
            acc.add_(s[k].to(acc.device), alpha=wi)
        out[k] = acc
    return out


# -- robust statistics (algorithms/robust.py composes them around any strategy) -----------------


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median of equally shaped tensors (Yin et al. 2018, https://arxiv.org/abs/1803.01498).

    Unweighted; with an even count, the mean of the two middle values (not torch.median's lower one).
    """
    if not tensors:
        raise AggregationError("median of no tensors")
    stacked = torch.stack([t.to(torch.float64) for t in tensors])
    ordered = stacked.sort(dim=0).values
    n = len(tensors)
    mid = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return mid.to(tensors[0].dtype)


def trimmed_mean(tensors: Sequence[torch.Tensor], trim: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``floor(trim * n)`` lowest and highest values (unweighted)."""
    if not tensors:
        raise AggregationError("trimmed mean of no tensors")
    if not 0 <= trim < 0.5:
        raise AggregationError(f"trim must be in [0, 0.5), got {trim}")
    n = len(tensors)
    k = int(trim * n + 1e-9)
    ordered = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values
    return ordered[k : n - k].mean(dim=0).to(tensors[0].dtype)


def update_norm(state: StateDict, reference: StateDict) -> float:
    """L2 norm of ``state - reference`` over the floating tensors both hold with the same shape."""
    total = 0.0
    for k, v in state.items():
        r = reference.get(k)
        if r is not None and v.is_floating_point() and r.shape == v.shape:
            total += float((v.double() - r.double()).pow(2).sum())
    return total**0.5


def clip_update(state: StateDict, reference: StateDict, max_norm: float) -> tuple[StateDict, float]:
    """``reference + (state - reference) * min(1, max_norm / ||state - reference||)`` and the norm before.

    Tensors without a same-shaped reference (a personal part, counters) are kept as they are.
    """
    norm = update_norm(state, reference)
    if norm <= max_norm or norm == 0:
        return state, norm
    scale = max_norm / norm
    out = {}
    for k, v in state.items():
        r = reference.get(k)
        if r is not None and v.is_floating_point() and r.shape == v.shape:
            out[k] = (r.double() + (v.double() - r.double()) * scale).to(v.dtype)
        else:
            out[k] = v
    return out, norm
