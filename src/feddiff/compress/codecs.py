"""Tensor codecs: how one tensor becomes storage tensors on the wire, and back.

A codec's ``encode`` returns storage tensors (named by suffix) plus parameters (always empty: the
wire's groups carry none; the codec's settings travel once per message); ``decode`` inverts it. The
wire (``wire.py``) calls the group methods, which lay many tensors' storage end to end and must give
the same bytes as ``encode`` tensor by tensor. What the ledger counts is always the real serialized
length, scales and headers included.

Codecs (``make_codec(name, **settings)``; the settings round-trip through ``config()``):

=========  ==========================================  ===========================================
name       settings                                    storage per tensor of ``n`` elements
=========  ==========================================  ===========================================
identity   none                                        ``""``: the tensor as it is
fp16       none                                        ``""``: float16, same shape
bf16       none                                        ``""``: bfloat16, same shape
int8       ``scheme`` = ``"affine"`` | ``"channel"``,  affine: ``q`` uint8 (shape), ``affine``
           ``stochastic_rounding`` = False | True      float32 [offset, scale]; channel: ``q`` int8
                                                       (shape), ``absmax`` float32 [rows]
int4       as int8                                     ``q`` uint8 [ceil(n / 2)], two levels per
                                                       byte; ``affine`` or ``absmax`` as int8
=========  ==========================================  ===========================================

FedDM-quant (Vora et al. 2024, https://arxiv.org/abs/2407.14730) reports "up to 4x" less
communication: ``int8`` on float32. The quantization math lives in :mod:`.quantize`.

- ``affine``: one asymmetric grid per tensor, ``2**bits`` levels from ``min`` to ``max``
  (``scale = (max - min) / (2**bits - 1)``); every value is within ``scale / 2`` of its level.
- ``channel``: one symmetric grid per index of dim 0 (output channel) for tensors with
  ``ndim >= 2``, levels ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1`` (int8: -127..127, int4: -7..7),
  ``scale = absmax / 127`` (int4: ``/ 7``); 1-D tensors and scalars use one grid (rows = 1).
- int4 nibble order: element ``2i`` in the low nibble, ``2i + 1`` in the high nibble of byte ``i``;
  an odd count leaves the last high nibble 0. Channel levels travel as ``level + 8`` (1..15).
- ``stochastic_rounding=True`` rounds up with probability equal to the fractional part (unbiased),
  drawing from the ``generator`` given to ``encode``; without one, ``encode`` raises
  :class:`CodecError` (randomness is owned and seeded by the caller, never global).
  Otherwise rounding is to nearest (ties to even).

Decisions, the same for every lossy codec:

- NaN or Inf in the input raises :class:`CodecError` (count and first index in the text): a
  diverged client must not silently send garbage. ``identity`` passes such values through.
- fp16/bf16 saturate: values beyond the finite range (fp16: +-65504) become +-max, never inf.
  Below 2**-14 in magnitude fp16 is subnormal: absolute error at most 2**-25 (so values under
  2**-25 become 0) instead of relative error 2**-11.
- int8/int4: constant tensors (scale 0) and constant channels round-trip exactly. Every codec
  handles empty tensors; decoded tensors always have the original shape and dtype.
- int8/int4 affine refuses a range wider than the float32 maximum (``max - min`` would overflow);
  ``channel`` handles it.
- ``decode`` checks every storage part's dtype and size against the header and raises
  :class:`CodecError` on any mismatch, missing or extra part, or out-of-range value.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import numpy as np
import torch

from feddiff.compress.quantize import (
    BLOCK,
    affine_grid,
    dequantize_affine,
    dequantize_symmetric,
    pack_nibbles,
    quantize_affine,
    quantize_symmetric,
    segments,
    row_absmax,
    unpack_nibbles,
)

Storage = dict[str, torch.Tensor]
_FLOAT32_MAX = torch.finfo(torch.float32).max


class CodecError(ValueError):
    """Storage or parameters do not fit the codec (corrupted or inconsistent message)."""


class TensorError(CodecError):
    """A :class:`CodecError` of the ``index``-th tensor of a group (the wire names it)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class Codec:
    """Base class: identity (tensors travel as they are, fp32 stays fp32)."""

    name: ClassVar[str] = "identity"
    lossy: ClassVar[bool] = False
    # True: a group's storage is one part, "", holding the tensors' own bytes one after another (the
    # identity). The wire then copies them into and out of the frame itself, checksum fused in (crc.Running).
    verbatim: ClassVar[bool] = False
    settings: ClassVar[tuple[str, ...]] = ()  # constructor keywords, echoed by config()

    def config(self) -> dict[str, Any]:
        """Codec-level settings, written into every message header."""
        return {key: getattr(self, key) for key in self.settings}

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[Storage, dict[str, Any]]:
        return {"": x.detach().contiguous()}, {}

    def decode(self, storage: Storage, params: dict[str, Any], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        if params != {}:
            raise CodecError(f"identity: unexpected codec parameters {params!r}")
        _check_parts(self.name, storage, [""])
        x = storage[""]
        if list(x.shape) != list(shape) or x.dtype != dtype:
            raise CodecError(f"identity: stored {x.dtype}{list(x.shape)} but header says {dtype}{list(shape)}")
        return x

    # --- groups: many tensors of one dtype at once (what the wire calls) ---------------------------
    #
    # A group's storage is one flat array per part, each tensor's part laid out after the previous
    # tensor's, so the layout follows from the shapes alone. The per-tensor ``layout``, ``encode`` and
    # ``decode`` define it; subclasses override the group methods only to do the same work in fewer,
    # larger operations (the result must be the same bytes and the same tensors).

    def layout(self, shape: list[int], dtype: torch.dtype) -> dict[str, tuple[torch.dtype, list[int]]]:
        """Storage of one tensor of ``shape`` and ``dtype``: part suffix -> (dtype, shape), in storage order."""
        return {"": (dtype, list(shape))}

    def group_layout(self, shapes: list[list[int]], numels: list[int],
                     dtype: torch.dtype) -> dict[str, tuple[torch.dtype, list[int]]]:
        """Storage of a group: part suffix -> (dtype, each tensor's element count in that part).

        ``shapes`` have been checked (non-negative integers) and ``numels`` are their products. Raises
        :class:`TensorError` if a tensor cannot use this codec (e.g. an integer dtype for a lossy codec).
        """
        out: dict[str, tuple[torch.dtype, list[int]]] = {}
        for i, shape in enumerate(shapes):
            try:
                parts = self.layout(shape, dtype)
            except CodecError as err:
                raise TensorError(i, str(err)) from None
            for suffix, (part_dtype, part_shape) in parts.items():
                out.setdefault(suffix, (part_dtype, []))[1].append(math.prod(part_shape))
        return out

    def encode_group(self, xs: list[torch.Tensor], out: Storage, generator: torch.Generator | None = None) -> None:
        """Write the storage of the CPU tensors ``xs`` (one dtype) into ``out``'s flat parts (from ``group_layout``).

        Raises :class:`TensorError` naming the first tensor that cannot be encoded.
        """
        offsets = dict.fromkeys(out, 0)
        for i, x in enumerate(xs):
            try:
                parts, params = self.encode(x, generator)
            except CodecError as err:
                raise TensorError(i, str(err)) from None
            if params:
                raise TensorError(i, f"{self.name}: codec parameters {params!r} cannot travel in a group")
            for suffix, t in parts.items():
                n = t.numel()
                out[suffix][offsets[suffix] : offsets[suffix] + n].copy_(t.reshape(-1))
                offsets[suffix] += n
        short = [s for s in out if offsets[s] != out[s].numel()]
        if short:  # every byte of a frame is written by its codec (a frame is not zeroed first)
            raise CodecError(f"{self.name}: part {short[0]!r} holds {offsets[short[0]]} elements; its layout "
                             f"has {out[short[0]].numel()}")

    def decode_group(self, raw: Storage, shapes: list[list[int]], numels: list[int],
                     dtype: torch.dtype) -> list[torch.Tensor]:
        """The tensors of a group from its parts: ``raw[suffix]`` is that part's bytes as a flat uint8
        tensor of the frame's read-only memory (never written, never returned: results own their memory).

        Raises :class:`TensorError` naming the first tensor whose storage is invalid.
        """
        layouts = [self.layout(shape, dtype) for shape in shapes]
        flat = {s: raw[s].clone().view(part_dtype) for s, (part_dtype, _) in layouts[0].items()} if layouts else {}
        offsets = dict.fromkeys(flat, 0)
        out = []
        for i, (shape, layout) in enumerate(zip(shapes, layouts)):
            parts = {}
            for suffix, (_, part_shape) in layout.items():
                n = math.prod(part_shape)
                parts[suffix] = flat[suffix][offsets[suffix] : offsets[suffix] + n].view(part_shape)
                offsets[suffix] += n
            try:
                out.append(self.decode(parts, {}, shape, dtype))
            except CodecError as err:
                raise TensorError(i, str(err)) from None
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"


class IdentityCodec(Codec):
    """The identity with group operations of one copy each: a concatenation and a clone."""

    verbatim = True

    def group_layout(self, shapes: list[list[int]], numels: list[int],
                     dtype: torch.dtype) -> dict[str, tuple[torch.dtype, list[int]]]:
        return {"": (dtype, list(numels))}

    def encode_group(self, xs: list[torch.Tensor], out: Storage, generator: torch.Generator | None = None) -> None:
        torch.cat(flat_list(xs), out=out[""])

    def decode_group(self, raw: Storage, shapes: list[list[int]], numels: list[int],
                     dtype: torch.dtype) -> list[torch.Tensor]:
        if dtype == torch.bool and raw[""].numel() and int(raw[""].max()) > 1:
            raise CodecError(f"identity: a bool tensor holds the byte {int(raw[''].max())}; bools are 0 or 1")
        return copy_out(raw[""], dtype, shapes, numels, lambda stored: stored.clone())


class HalfCodec(Codec):
    """Cast to a 16-bit float and back; values beyond its finite range saturate."""

    lossy = True
    storage_dtype: ClassVar[torch.dtype]

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[Storage, dict[str, Any]]:
        _check_floating(self.name, x)
        lo, hi = _finite_range(self.name, x)
        limit = torch.finfo(self.storage_dtype).max
        if lo < -limit or hi > limit:
            x = x.clamp(-limit, limit)
        # copy=True: a 16-bit input must not share memory with the caller's tensor in the blob
        return {"": x.to(self.storage_dtype, copy=True)}, {}

    def decode(self, storage: Storage, params: dict[str, Any], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        shape = _check_header(self.name, params, shape, dtype)
        _check_parts(self.name, storage, [""])
        return _part(self.name, storage, "", self.storage_dtype, shape).to(dtype)

    def layout(self, shape: list[int], dtype: torch.dtype) -> dict[str, tuple[torch.dtype, list[int]]]:
        _check_header(self.name, {}, shape, dtype)
        return {"": (self.storage_dtype, list(shape))}

    def encode_group(self, xs: list[torch.Tensor], out: Storage, generator: torch.Generator | None = None) -> None:
        # one cast of everything; anything not finite afterwards (NaN, Inf, or beyond the 16-bit
        # range) takes the per-tensor path, which saturates or names the tensor
        torch.cat(flat_list(xs), out=out[""])
        if not bool(torch.isfinite(out[""]).all()):
            super().encode_group(xs, out, generator)

    def decode_group(self, raw: Storage, shapes: list[list[int]], numels: list[int],
                     dtype: torch.dtype) -> list[torch.Tensor]:
        _check_header(self.name, {}, [], dtype)
        return copy_out(raw[""], self.storage_dtype, shapes, numels,
                         lambda stored: stored.to(dtype) if dtype != self.storage_dtype else stored.clone())


class Float16Codec(HalfCodec):
    """IEEE half precision: 11 significant bits, finite range +-65504."""

    name = "fp16"
    storage_dtype = torch.float16


class BFloat16Codec(HalfCodec):
    """bfloat16: 8 significant bits, the float32 exponent range."""

    name = "bf16"
    storage_dtype = torch.bfloat16


class IntCodec(Codec):
    """Uniform ``bits``-bit quantization, per tensor (affine) or per output channel (symmetric)."""

    lossy = True
    bits: ClassVar[int]
    settings = ("scheme", "stochastic_rounding")
    SCHEMES: ClassVar[tuple[str, ...]] = ("affine", "channel")

    def __init__(self, scheme: str = "affine", stochastic_rounding: bool = False):
        if scheme not in self.SCHEMES:
            raise ValueError(f"{self.name}: scheme must be one of {list(self.SCHEMES)}, got {scheme!r}")
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"{self.name}: stochastic_rounding must be true or false, got {stochastic_rounding!r}")
        self.scheme = scheme
        self.stochastic_rounding = stochastic_rounding

    @property
    def max_level(self) -> int:
        """Highest level: ``2**bits - 1`` (affine, from 0) or ``2**(bits-1) - 1`` (channel, symmetric)."""
        return 2**self.bits - 1 if self.scheme == "affine" else 2 ** (self.bits - 1) - 1

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[Storage, dict[str, Any]]:
        g = self._rounding_generator(generator)
        _check_floating(self.name, x)
        x32 = x.to(torch.float32)
        if self.scheme == "affine":
            q, grid = self._affine(x32, x, g)
            return {"q": self._store(q, signed=False), "affine": grid}, {}
        rows = _rows_view(x32)
        absmax = row_absmax(rows)
        if not bool(torch.isfinite(absmax).all()):
            raise _nonfinite_error(self.name, x)
        q = quantize_symmetric(rows, absmax, self.max_level, g).reshape(x.shape)
        return {"q": self._store(q, signed=True), "absmax": absmax}, {}

    def _affine(self, x32: torch.Tensor, original: torch.Tensor, generator: torch.Generator | None,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels, float32 grid ``[offset, scale]``) of the float32 ``x32`` on its affine grid (the levels
        into ``out`` if given); CodecError, naming ``original``'s values, if it cannot have one."""
        lo, hi = _finite_range(self.name, x32, original=original)
        if hi - lo > _FLOAT32_MAX:  # x - min would overflow to inf
            raise CodecError(f"{self.name}: value range [{lo:.4g}, {hi:.4g}] is wider than the float32 "
                             "maximum; scheme='affine' cannot represent it (scheme='channel' can)")
        grid = affine_grid(lo, hi, self.max_level)
        offset, scale = grid.tolist()  # the float32 values that travel, so both ends agree
        return quantize_affine(x32, offset, scale, self.max_level, generator, out=out), grid

    def decode(self, storage: Storage, params: dict[str, Any], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        shape = _check_header(self.name, params, shape, dtype)
        n = math.prod(shape)
        if self.scheme == "affine":
            _check_parts(self.name, storage, ["q", "affine"])
            offset, scale = _part(self.name, storage, "affine", torch.float32, [2]).tolist()
            if not (math.isfinite(offset) and math.isfinite(scale) and scale >= 0):
                raise CodecError(f"{self.name}: invalid affine grid offset={offset}, scale={scale}")
            q = self._load(storage["q"], shape, n, signed=False)
            return dequantize_affine(q, offset, scale).reshape(shape).to(dtype)
        _check_parts(self.name, storage, ["q", "absmax"])
        num_rows = _num_rows(shape)
        absmax = _part(self.name, storage, "absmax", torch.float32, [num_rows])
        if not bool((torch.isfinite(absmax) & (absmax >= 0)).all()):
            raise CodecError(f"{self.name}: absmax must be finite and >= 0, got {absmax.tolist()[:8]}")
        q = self._load(storage["q"], shape, n, signed=True)
        if n and int(q.min()) < -self.max_level:
            raise CodecError(f"{self.name}: level {int(q.min())} is outside [-{self.max_level}, {self.max_level}]")
        q2 = q.reshape(num_rows, n // num_rows if num_rows else 0)
        return dequantize_symmetric(q2, absmax, self.max_level).reshape(shape).to(dtype)

    def layout(self, shape: list[int], dtype: torch.dtype) -> dict[str, tuple[torch.dtype, list[int]]]:
        shape = _check_header(self.name, {}, shape, dtype)
        n = math.prod(shape)
        q = (self.level_dtype, [(n + 1) // 2] if self.bits == 4 else shape)
        if self.scheme == "affine":
            return {"q": q, "affine": (torch.float32, [2])}
        return {"q": q, "absmax": (torch.float32, [_num_rows(shape)])}

    def _batched(self) -> bool:
        """Whether the group methods below apply: int8 affine with round-to-nearest (the FedDM-quant
        codec). The others (channel grids, int4 nibbles, stochastic rounding, whose noise is drawn
        tensor by tensor) take the per-tensor path."""
        return self.bits == 8 and self.scheme == "affine" and not self.stochastic_rounding

    def group_layout(self, shapes: list[list[int]], numels: list[int],
                     dtype: torch.dtype) -> dict[str, tuple[torch.dtype, list[int]]]:
        _check_header(self.name, {}, [], dtype)
        q = [(n + 1) // 2 for n in numels] if self.bits == 4 else list(numels)
        if self.scheme == "affine":
            return {"q": (self.level_dtype, q), "affine": (torch.float32, [2] * len(numels))}
        return {"q": (self.level_dtype, q), "absmax": (torch.float32, [_num_rows(s) for s in shapes])}

    @property
    def level_dtype(self) -> torch.dtype:
        """The dtype of the stored levels: int8 for int8 channel grids, else uint8 (affine levels, nibbles)."""
        return torch.int8 if self.bits == 8 and self.scheme == "channel" else torch.uint8

    def encode_group(self, xs: list[torch.Tensor], out: Storage, generator: torch.Generator | None = None) -> None:
        """int8 affine: the same levels and grids as :meth:`encode`, computed over runs of tensors of at
        most 4 x ``quantize.BLOCK`` elements at once (:class:`.quantize.Segments`); a tensor of more than
        ``BLOCK`` elements alone in its run goes block by block."""
        if not self._batched():
            return super().encode_group(xs, out, generator)
        numels = [x.numel() for x in xs]
        q, grid, start = out["q"].numpy(), out["affine"].view(-1, 2).numpy(), 0
        for i, j in consecutive_runs(numels):  # runs of at most 4 x BLOCK elements, each quantized at once
            xs32 = [x if x.dtype == torch.float32 else x.to(torch.float32) for x in xs[i:j]]
            n = sum(numels[i:j])
            if j - i == 1 and n > BLOCK:  # alone in its run: block by block, with the per-tensor code
                try:
                    grid[i] = self._affine(xs32[0], xs[i], None, out=out["q"][start : start + n])[1].numpy()
                except CodecError:
                    return super().encode_group(xs, out, generator)  # names the tensor and what is wrong with it
            elif not segments(tuple(numels[i:j])).grid_and_levels(xs32, self.max_level, grid[i:j],
                                                                  q[start : start + n]):
                return super().encode_group(xs, out, generator)  # names the tensor and what is wrong with it
            start += n

    def decode_group(self, raw: Storage, shapes: list[list[int]], numels: list[int],
                     dtype: torch.dtype) -> list[torch.Tensor]:
        """int8 affine: the values of a run of tensors computed at once (:class:`.quantize.Segments`)."""
        if not self._batched():
            return super().decode_group(raw, shapes, numels, dtype)
        _check_header(self.name, {}, [], dtype)
        grid = raw["affine"].numpy().view(np.float32).reshape(-1, 2)
        if not (np.isfinite(grid).all() and (grid[:, 1] >= 0).all()):
            return super().decode_group(raw, shapes, numels, dtype)  # names the tensor
        q, out, start = raw["q"].numpy(), [], 0
        for i, j in consecutive_runs(numels):  # one buffer per run (see consecutive_runs)
            n = sum(numels[i:j])
            values = torch.empty(n, dtype=torch.float32)
            if j - i == 1 and n > BLOCK:
                dequantize_affine(raw["q"][start : start + n], float(grid[i, 0]), float(grid[i, 1]), out=values)
            else:
                segments(tuple(numels[i:j])).values(q[start : start + n], grid[i:j, 0], grid[i:j, 1], values.numpy())
            views = shaped(values.split_with_sizes(numels[i:j]), shapes[i:j])
            out += views if dtype == torch.float32 else [v.to(dtype) for v in views]
            start += n
        return out

    def _rounding_generator(self, generator: torch.Generator | None) -> torch.Generator | None:
        """The generator to round with: None (round to nearest) unless stochastic_rounding."""
        if not self.stochastic_rounding:
            return None
        if not isinstance(generator, torch.Generator):
            raise CodecError(
                f"{self.name}: stochastic_rounding=True draws its noise from a seeded torch.Generator; "
                f"pass one, e.g. wire.encode(message, codec, generator=g) (got {generator!r})"
            )
        if generator.device.type != "cpu":
            raise CodecError(f"{self.name}: the rounding generator must be a CPU generator, got {generator.device}")
        return generator

    def _store(self, q: torch.Tensor, signed: bool) -> torch.Tensor:
        """The ``q`` storage tensor for levels ``q`` (uint8 affine or int8 symmetric, tensor-shaped)."""
        raise NotImplementedError

    def _load(self, stored: torch.Tensor, shape: list[int], n: int, signed: bool) -> torch.Tensor:
        """Validated levels (uint8 affine or int8 symmetric) of shape ``shape`` from ``stored``."""
        raise NotImplementedError


class Int8Codec(IntCodec):
    """One byte per value: 4x fewer bytes than float32."""

    name = "int8"
    bits = 8

    def _store(self, q: torch.Tensor, signed: bool) -> torch.Tensor:
        return q

    def _load(self, stored: torch.Tensor, shape: list[int], n: int, signed: bool) -> torch.Tensor:
        return _checked(self.name, "q", stored, torch.int8 if signed else torch.uint8, shape)


class Int4Codec(IntCodec):
    """Half a byte per value, two per byte: 8x fewer bytes than float32."""

    name = "int4"
    bits = 4

    def _store(self, q: torch.Tensor, signed: bool) -> torch.Tensor:
        nibbles = (q + 8).view(torch.uint8) if signed else q  # -7..7 -> 1..15
        return pack_nibbles(nibbles)

    def _load(self, stored: torch.Tensor, shape: list[int], n: int, signed: bool) -> torch.Tensor:
        packed = _checked(self.name, "q", stored, torch.uint8, [(n + 1) // 2])
        if n % 2 and int(packed[-1]) >> 4:
            raise CodecError(f"{self.name}: padding nibble of the last byte is {int(packed[-1]) >> 4}, expected 0")
        nibbles = unpack_nibbles(packed, n).reshape(shape)
        return nibbles.view(torch.int8) - 8 if signed else nibbles  # 0..15 -> -8..7


# --- helpers: checks at the boundary -------------------------------------------------------------


def _get(storage: Storage, key: str) -> torch.Tensor:
    if key not in storage:
        raise CodecError(f"missing storage part {key!r}; have {sorted(storage)}")
    return storage[key]


def _check_parts(codec: str, storage: Storage, expected: list[str]) -> None:
    missing, extra = sorted(set(expected) - set(storage)), sorted(set(storage) - set(expected))
    if missing or extra:
        raise CodecError(f"{codec}: storage parts {sorted(storage)} do not match {expected} "
                         f"(missing {missing}, unexpected {extra})")


def _checked(codec: str, key: str, t: torch.Tensor, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if t.dtype != dtype or list(t.shape) != list(shape):
        raise CodecError(f"{codec}: storage part {key!r} is {_dtype_name(t.dtype)}{list(t.shape)}, "
                         f"expected {_dtype_name(dtype)}{list(shape)}")
    return t


def _part(codec: str, storage: Storage, key: str, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    return _checked(codec, key, _get(storage, key), dtype, shape)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_header(codec: str, params: Any, shape: Any, dtype: torch.dtype) -> list[int]:
    """The header's shape as a list, after checking it, the dtype and the (empty) params."""
    if params != {}:
        raise CodecError(f"{codec}: unexpected codec parameters {params!r}")
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise CodecError(f"{codec}: invalid shape {shape!r}")
    if not dtype.is_floating_point:
        raise CodecError(f"{codec}: decodes to floating-point tensors only; header says {_dtype_name(dtype)}")
    return list(shape)


def _check_floating(codec: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise CodecError(f"{codec}: encodes floating-point tensors only, got {_dtype_name(x.dtype)}")


def _finite_range(codec: str, x: torch.Tensor, original: torch.Tensor | None = None) -> tuple[float, float]:
    """``(min, max)`` of ``x`` (``(0, 0)`` if empty); CodecError if not finite."""
    if x.numel() == 0:
        return 0.0, 0.0
    lo, hi = (v.item() + 0.0 for v in torch.aminmax(x))  # NaN propagates; + 0.0 makes a zero +0.0 (see below)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _nonfinite_error(codec, x if original is None else original)
    return lo, hi


def _nonfinite_error(codec: str, x: torch.Tensor) -> CodecError:
    """Describe what is not finite in ``x`` (only built on the error path)."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):  # finite float64 that overflows float32
        return CodecError(f"{codec}: cannot encode a tensor of shape {list(x.shape)} with values beyond "
                          f"the float32 range (max |x| = {x.abs().max().item():.4g})")
    first = torch.nonzero(bad)[0].tolist()
    return CodecError(f"{codec}: cannot encode a tensor of shape {list(x.shape)} with "
                      f"{int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} Inf value(s) "
                      f"(first at index {first}); non-finite weights usually mean local training diverged")


def _num_rows(shape: list[int] | torch.Size) -> int:
    """Rows of the per-channel grid: dim 0 for ``ndim >= 2``, else one row."""
    return shape[0] if len(shape) >= 2 else 1


def consecutive_runs(numels: list[int] | tuple[int, ...], limit: int = 4 * BLOCK) -> tuple[tuple[int, int], ...]:
    """``(i, j)`` spans of consecutive tensors of at most ``limit`` elements together (a larger tensor:
    alone). Buffers of a run's size come from the allocator's reused memory, as a clone of each tensor
    would, where one buffer for a whole state dict would be fresh pages (page faults: measured to cost as
    much as the copy itself); the wire also checksums a frame run by run as it writes it. Kept for the
    last few layouts of at most 4,096 tensors (every message of a run has the same; a peer's frame cannot
    make the cache hold more than that)."""
    return _runs(tuple(numels), limit) if len(numels) <= 4096 else _runs.__wrapped__(tuple(numels), limit)


@functools.lru_cache(maxsize=16)
def _runs(numels: tuple[int, ...], limit: int) -> tuple[tuple[int, int], ...]:
    runs: list[tuple[int, int]] = []
    total = 0
    for k, n in enumerate(numels):
        if runs and total + n <= limit:
            runs[-1] = (runs[-1][0], k + 1)
            total += n
        else:
            runs.append((k, k + 1))
            total = n
    return tuple(runs)


def flat_list(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as 1-D ones (views where they can be), for a concatenation. A 1-D tensor is taken as it
    is: at a few hundred tensors per message, the ``reshape`` calls alone cost a tenth of the copy."""
    return [x if x.dim() == 1 else x.reshape(-1) for x in xs]


def shaped(flats: tuple[torch.Tensor, ...] | list[torch.Tensor], shapes: list[list[int]]) -> list[torch.Tensor]:
    """The 1-D ``flats`` viewed as ``shapes`` (1-D ones as they are: see :func:`flat_list`)."""
    return [v if len(shape) == 1 else v.view(shape) for v, shape in zip(flats, shapes)]


def copy_out(raw: torch.Tensor, stored: torch.dtype, shapes: list[list[int]], numels: list[int],
              convert: Any) -> list[torch.Tensor]:
    """Tensors of ``shapes`` from ``raw`` (the frame's bytes of values stored as ``stored``), copied out of
    the frame run by run with ``convert`` (which must return new memory), as views of each run's copy."""
    out, start = [], 0
    for i, j in consecutive_runs(numels, BLOCK * 4 // stored.itemsize):  # about 1 MiB of the frame per copy
        n = sum(numels[i:j]) * stored.itemsize
        values = convert(raw[start : start + n].view(stored))
        out += shaped(values.split_with_sizes(numels[i:j]), shapes[i:j])
        start += n
    return out


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    rows = _num_rows(x.shape)
    return x.reshape(rows, x.numel() // rows if rows else 0)


IDENTITY = IdentityCodec()

CODECS: dict[str, type[Codec]] = {
    "identity": IdentityCodec,
    "fp16": Float16Codec,
    "bf16": BFloat16Codec,
    "int8": Int8Codec,
    "int4": Int4Codec,
}


def make_codec(name: str, **settings: Any) -> Codec:
    """Build a codec by name; unknown names list the valid ones, unknown settings name the valid ones."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose from {sorted(CODECS)}")
    cls = CODECS[name]
    unknown = sorted(set(settings) - set(cls.settings))
    if unknown:
        raise ValueError(f"codec {name!r} has no setting(s) {unknown}; its settings are {list(cls.settings)}")
    return cls(**settings)
