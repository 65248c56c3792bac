"""Uniform quantization math: plain functions over tensors, no I/O, no wire format.

Two grids, both with round-to-nearest or stochastic rounding (Gupta et al. 2015, "Deep Learning
with Limited Numerical Precision", https://arxiv.org/abs/1502.02551):

- affine (asymmetric, one grid per tensor): level ``q`` in ``0..max_level`` means
  ``offset + q * scale`` with ``offset = min(x)`` and ``scale = (max(x) - min(x)) / max_level``.
  The offset is kept as a real number (not an integer zero point), so the whole ``[min, max]``
  range is covered and every value is within ``scale / 2`` of its level.
- symmetric (one grid per row of a 2-D view): level ``q`` in ``-max_level..max_level`` means
  ``q / max_level * absmax`` with ``absmax = max |x_row|``. Decoding divides by ``max_level``
  before multiplying, so ``q = +-max_level`` gives back ``+-absmax`` exactly.

Stochastic rounding maps ``v`` to ``floor(v + u)`` with ``u ~ U[0, 1)``: up with probability
``frac(v)``, so ``E[q] = v`` and the rounding error averages out over clients and rounds.
All arithmetic is float32; callers convert other floating dtypes first.

Quantizers work block by block through one reused float32 buffer of at most ``BLOCK`` elements:
a full-size float32 temporary would cost more than the arithmetic (fresh pages, memory
traffic); blocks made int8 encode of a 134 MB tensor 2.5x faster, about a plain copy's speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch

BLOCK = 1 << 18  # elements: a 1 MiB float32 temporary that stays in cache


def round_levels(v: torch.Tensor, min_level: int, max_level: int, generator: torch.Generator | None) -> torch.Tensor:
    """Round ``v`` (float32, modified in place) to integers in ``[min_level, max_level]``.

    Parameters
    ----------
    v : torch.Tensor
        Values in level units, float32; overwritten.
    min_level, max_level : int
        Inclusive range of the levels (clamped after rounding).
    generator : torch.Generator or None
        None: round to nearest (ties to even, ``torch.round``). Otherwise stochastic rounding
        with uniform noise drawn from this generator (one draw per element).
    """
    if generator is None:
        v.round_()
    else:
        v.add_(torch.rand(v.shape, generator=generator, dtype=torch.float32)).floor_()
    # Clamping after rounding also absorbs float error at the range ends (e.g. 255.00002).
    return v.clamp_(min_level, max_level)


def affine_grid(lo: float, hi: float, max_level: int) -> torch.Tensor:
    """The float32 pair ``[offset, scale]`` of an affine grid spanning ``[lo, hi]``.

    ``scale = (hi - lo) / max_level`` is computed in float64 first, so ``hi - lo`` cannot
    overflow for values near the float32 limit.
    """
    return torch.tensor([lo, (hi - lo) / max_level], dtype=torch.float32)


def quantize_affine(
    x: torch.Tensor, offset: float, scale: float, max_level: int, generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Levels ``0..max_level`` (uint8, same shape as ``x``) of float32 ``x`` on an affine grid.

    ``offset`` and ``scale`` must be the exact values the decoder will use (the float32 values
    that travel), so encode and decode agree on the grid. ``scale == 0`` (a constant tensor)
    gives all-zero levels. ``out``: a flat uint8 tensor of ``x.numel()`` to write the levels into
    (a message's storage), returned viewed as ``x``'s shape.
    """
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    if out is None:
        out = torch.empty(flat.numel(), dtype=torch.uint8)
    if scale == 0.0:
        return out.zero_().view(x.shape)
    buf = torch.empty(min(BLOCK, flat.numel()), dtype=torch.float32)
    if generator is None:  # round to nearest: numpy's chain, a pass each, the block in cache
        src, lv, work = flat.numpy(), out.numpy(), buf.numpy()
        for start, end in _spans(flat.numel(), BLOCK):
            _levels(src[start:end], np.float32(offset), np.float32(scale), max_level, lv[start:end], work,
                    lowest=True)
        return out.view(x.shape)
    for start, end in _spans(flat.numel(), BLOCK):
        v = torch.sub(flat[start:end], offset, out=buf[: end - start]).div_(scale)
        store_levels(round_levels(v, 0, max_level, generator), out[start:end])
    return out.view(x.shape)


def _levels(x: np.ndarray, offset: Any, scale: Any, max_level: int, out: np.ndarray,
            work: np.ndarray | None = None, lowest: bool = False) -> None:
    """``out = clip(rint((x - offset) / scale), 0, max_level)``, the round-to-nearest levels of float32
    ``x`` (``work``: a float32 buffer of at least its size; else ``x`` itself is overwritten), each step
    the float32 operation torch's ``sub_``, ``div_``, ``round_`` (half to even) and ``clamp_`` make, so
    the levels are theirs bit for bit; ``offset`` and ``scale`` may be per-element arrays.
    ``lowest``: clamp at level 0 too; without it ``offset`` must be at most the min of ``x``. numpy's
    ufuncs write the clamped levels straight into ``out`` (their cast to uint8 is exact: integral values
    in range) and cost about a microsecond a call, where a torch call costs several."""
    v = x if work is None else work[: x.shape[0]]
    np.subtract(x, offset, out=v)
    np.divide(v, scale, out=v)
    np.rint(v, out=v)
    if lowest:
        np.maximum(v, 0, out=v)
    # else x >= offset (the min of the tensor, a float32) makes x - offset >= +0 and every step after it:
    # the lower clamp would never act, and the upper one is a minimum (np.clip: a Python wrapper of both)
    np.minimum(v, max_level, out=out, casting="unsafe")


def store_levels(levels: torch.Tensor, out: torch.Tensor) -> None:
    """Write float32 ``levels`` (integers in ``out``'s range, as :func:`round_levels` leaves them) into
    the CPU tensor ``out`` of the same size. numpy's cast does this 3.4x faster than torch's float to
    uint8 copy here (19 vs 66 us per 256K elements); for integral values in range both are exact."""
    np.copyto(out.numpy(), levels.numpy(), casting="unsafe")


def dequantize_affine(q: torch.Tensor, offset: float, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 ``offset + q * scale`` for integer levels ``q``; into the flat float32 ``out`` (block by
    block, in cache) when given, returned viewed as ``q``'s shape."""
    if out is None:
        return q.to(torch.float32).mul_(scale).add_(offset)
    flat, values = q.reshape(-1).numpy(), out.numpy()
    for start, end in _spans(flat.shape[0], BLOCK):
        _values(flat[start:end], np.float32(offset), np.float32(scale), values[start:end])
    return out.view(q.shape)


def _values(q: np.ndarray, offset: Any, scale: Any, out: np.ndarray) -> None:
    """``out = q * scale + offset`` in float32, two roundings as torch's ``to(float32).mul_().add_()``
    (the level's conversion is exact); ``offset`` and ``scale`` may be per-element arrays."""
    np.multiply(q, scale, out=out, dtype=np.float32)
    np.add(out, offset, out=out)


@lru_cache(maxsize=8)
def _cached_segments(numels: tuple[int, ...]) -> Segments:
    return Segments(list(numels))


def segments(numels: tuple[int, ...]) -> Segments:
    """The :class:`Segments` of a layout: cached when it has at most 1,024 tensors (a run sends the same
    state dict's layout every message; a frame from a peer cannot make the cache hold much: at most 8
    layouts of at most 1,024 x TINY indexed elements each)."""
    return _cached_segments(numels) if len(numels) <= 1024 else Segments(list(numels))


class Segments:
    """Tensors of ``numels`` elements laid end to end (a run of a message's group): the affine grids and
    levels of all of them, and their values back, in a few calls instead of several per tensor (a
    U-Net's state dict is mostly biases and norms of a few hundred elements, where a call costs more
    than its arithmetic).

    Tensors of at most ``TINY`` elements are concatenated and handled together: their mins and maxes
    from one ``np.minimum.reduceat`` and one ``np.maximum.reduceat``, each element then with its
    tensor's grid. Larger ones are read where they are, with a chain of numpy calls each, block by
    block through a buffer that stays in cache. Every element sees the float32 operations of the
    per-tensor path, so the results equal its bit for bit.
    """

    TINY = 1024

    def __init__(self, numels: list[int]):
        self.numels = list(numels)
        counts = np.asarray(numels, dtype=np.int64)
        starts = np.cumsum(counts) - counts
        self.large = [(i, int(starts[i]), int(starts[i] + n)) for i, n in enumerate(numels) if n > self.TINY]
        self.small = [i for i, n in enumerate(numels) if 0 < n <= self.TINY]
        if self.small:
            sizes = counts[self.small]
            self.firsts = np.cumsum(sizes) - sizes  # where each starts among the small ones: reduceat's indices
            self.seg = np.repeat(np.asarray(self.small, dtype=np.int64), sizes)  # the tensor of each element
            self.index = np.arange(int(sizes.sum())) + np.repeat(starts[self.small] - self.firsts, sizes)

    def grid_and_levels(self, xs: list[torch.Tensor], max_level: int, grid: np.ndarray, out: np.ndarray) -> bool:
        """The affine grid ``[offset, scale]`` of every float32 tensor of ``xs`` into ``grid`` (``[k, 2]``
        float32: ``[0, 0]`` for empty ones) and their levels into the uint8 ``out``; False, with nothing
        of ``out`` written, if a tensor is not finite or its range is wider than the float32 maximum."""
        ends = np.zeros((len(self.numels), 2), dtype=np.float32)
        sources = {}
        for i, _, _ in self.large:
            sources[i] = src = xs[i].detach().reshape(-1).numpy()
            ends[i] = np.minimum.reduce(src), np.maximum.reduce(src)  # NaN propagates
        if self.small:
            small = torch.cat([xs[i].detach().reshape(-1) for i in self.small]).numpy()
            ends[self.small, 0] = np.minimum.reduceat(small, self.firsts)
            ends[self.small, 1] = np.maximum.reduceat(small, self.firsts)
        # in float64, as affine_grid computes the grid; a zero made +0.0 (reductions and aminmax may
        # disagree on the sign of a zero between 0.0 and -0.0)
        ends64 = ends.astype(np.float64) + 0.0
        lo, hi = ends64[:, 0], ends64[:, 1]
        if not (np.isfinite(ends64).all() and (hi - lo <= np.finfo(np.float32).max).all()):
            return False
        grid[:, 0], grid[:, 1] = lo, (hi - lo) / max_level  # rounded to float32: what travels
        offsets = grid[:, 0]
        scales = np.where(grid[:, 1] != 0, grid[:, 1], np.float32(1))  # scale 0: x - lo is 0 anyway
        work = np.empty(min(BLOCK, max((end - start for _, start, end in self.large), default=0)), dtype=np.float32)
        for i, start, end in self.large:
            src = sources[i]
            for a, b in _spans(end - start, BLOCK):
                _levels(src[a:b], offsets[i], scales[i], max_level, out[start + a : start + b], work)
        if self.small:
            out[self.index] = _gathered_levels(small, offsets[self.seg], scales[self.seg], max_level)
        return True

    def values(self, q: np.ndarray, offsets: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
        """The float32 values of every tensor's levels ``q`` (:func:`_values`) into ``out``."""
        for i, start, end in self.large:
            for a, b in _spans(end - start, BLOCK):
                _values(q[start + a : start + b], offsets[i], scales[i], out[start + a : start + b])
        if self.small:
            values = np.empty(len(self.index), dtype=np.float32)
            _values(q[self.index], offsets[self.seg], scales[self.seg], values)
            out[self.index] = values


def _gathered_levels(x: np.ndarray, offsets: np.ndarray, scales: np.ndarray, max_level: int) -> np.ndarray:
    levels = np.empty(x.shape[0], dtype=np.uint8)
    _levels(x, offsets, scales, max_level, levels)
    return levels


def row_absmax(x2: torch.Tensor) -> torch.Tensor:
    """``max |x|`` of every row of a 2-D float32 tensor (zeros for rows of length 0)."""
    if x2.shape[1] == 0:
        return torch.zeros(x2.shape[0], dtype=torch.float32)
    # amax and amin (NaN-propagating) without an |x| temporary; aminmax(dim=1) is 4x slower
    return torch.maximum(x2.amax(dim=1), x2.amin(dim=1).neg())


def quantize_symmetric(
    x2: torch.Tensor, absmax: torch.Tensor, max_level: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Levels ``-max_level..max_level`` (int8, shape of ``x2``) of a 2-D float32 tensor, per row.

    ``absmax`` holds one float32 value per row: the values that travel. Rows with
    ``absmax == 0`` are all zero and get level 0.
    """
    rows, cols = x2.shape
    scale = absmax / max_level
    # A zero scale (all-zero row, or absmax so small that absmax / max_level underflows) would
    # give 0/0: divide by 1 there instead; those rows are (almost) zero and round to level 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    out = torch.empty((rows, cols), dtype=torch.int8)
    step = max(1, BLOCK // max(cols, 1))  # whole rows per block
    buf = torch.empty(min(step, rows) * cols, dtype=torch.float32)
    for r0, r1 in _spans(rows, step):
        v = torch.div(x2[r0:r1], scale[r0:r1], out=buf[: (r1 - r0) * cols].view(r1 - r0, cols))
        out[r0:r1] = round_levels(v, -max_level, max_level, generator)
    return out


def dequantize_symmetric(q2: torch.Tensor, absmax: torch.Tensor, max_level: int) -> torch.Tensor:
    """Float32 ``q / max_level * absmax`` per row of a 2-D level tensor."""
    return q2.to(torch.float32).div_(max_level).mul_(absmax[:, None])


def pack_nibbles(levels: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values (uint8 in ``0..15``) two per byte.

    Element ``2i`` goes to the low nibble and ``2i + 1`` to the high nibble of byte ``i``
    (``byte = lo | hi << 4``); an odd count leaves the last high nibble zero. The result is a
    1-D uint8 tensor of ``ceil(n / 2)`` bytes.
    """
    flat = levels.reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    pairs = flat[: n - n % 2].view(-1, 2)
    torch.bitwise_or(pairs[:, 0], pairs[:, 1] << 4, out=packed[: n // 2])
    if n % 2:
        packed[-1] = flat[-1]
    return packed


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` 4-bit values (uint8) of ``packed``."""
    out = torch.empty(2 * packed.numel(), dtype=torch.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


def _spans(n: int, step: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive blocks of ``step`` covering ``range(n)``."""
    for start in range(0, n, step):
        yield start, min(start + step, n)
