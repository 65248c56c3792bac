"""Tensor codecs: how one tensor becomes storage tensors on the wire, and back.

A codec's ``encode`` returns storage tensors (named by suffix) plus small JSON-able parameters;
``decode`` inverts it. The message container (``wire.py``) turns storage into bytes, so what the
ledger counts is always the real serialized length, scales and headers included.

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

import math
from typing import Any, ClassVar

import torch

from feddiff.compress.quantize import (
    affine_grid,
    dequantize_affine,
    dequantize_symmetric,
    pack_nibbles,
    quantize_affine,
    quantize_symmetric,
    row_absmax,
    unpack_nibbles,
)

Storage = dict[str, torch.Tensor]
_FLOAT32_MAX = torch.finfo(torch.float32).max


class CodecError(ValueError):
    """Storage or parameters do not fit the codec (corrupted or inconsistent message)."""


class Codec:
    """Base class: identity (tensors travel as they are, fp32 stays fp32)."""

    name: ClassVar[str] = "identity"
    lossy: ClassVar[bool] = False
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

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"


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
            lo, hi = _finite_range(self.name, x32, original=x)
            if hi - lo > _FLOAT32_MAX:  # x - min would overflow to inf
                raise CodecError(f"{self.name}: value range [{lo:.4g}, {hi:.4g}] is wider than the float32 "
                                 "maximum; scheme='affine' cannot represent it (scheme='channel' can)")
            grid = affine_grid(lo, hi, self.max_level)
            offset, scale = grid.tolist()  # the float32 values that travel, so both ends agree
            q = quantize_affine(x32, offset, scale, self.max_level, g)
            return {"q": self._store(q, signed=False), "affine": grid}, {}
        rows = _rows_view(x32)
        absmax = row_absmax(rows)
        if not bool(torch.isfinite(absmax).all()):
            raise _nonfinite_error(self.name, x)
        q = quantize_symmetric(rows, absmax, self.max_level, g).reshape(x.shape)
        return {"q": self._store(q, signed=True), "absmax": absmax}, {}

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
    lo, hi = (v.item() for v in torch.aminmax(x))  # NaN propagates into min and max
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


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    rows = _num_rows(x.shape)
    return x.reshape(rows, x.numel() // rows if rows else 0)


IDENTITY = Codec()

CODECS: dict[str, type[Codec]] = {
    "identity": Codec,
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
