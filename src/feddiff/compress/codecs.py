"""Tensor codecs: how one tensor becomes storage tensors on the wire, and back.

A codec's ``encode`` returns storage tensors (named by suffix) plus small JSON-able parameters;
``decode`` inverts it. The message container (``wire.py``) turns storage into bytes, so what the
ledger counts is always the real serialized length.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

Storage = dict[str, torch.Tensor]


class CodecError(ValueError):
    """Storage or parameters do not fit the codec (corrupted or inconsistent message)."""


class Codec:
    """Base class: identity (tensors travel as they are, fp32 stays fp32)."""

    name: ClassVar[str] = "identity"
    lossy: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """Codec-level settings, written into every message header."""
        return {}

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[Storage, dict[str, Any]]:
        return {"": x.detach().contiguous()}, {}

    def decode(self, storage: Storage, params: dict[str, Any], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        x = _get(storage, "")
        if list(x.shape) != list(shape) or x.dtype != dtype:
            raise CodecError(f"identity: stored {x.dtype}{list(x.shape)} but header says {dtype}{list(shape)}")
        return x


def _get(storage: Storage, key: str) -> torch.Tensor:
    if key not in storage:
        raise CodecError(f"missing storage part {key!r}; have {sorted(storage)}")
    return storage[key]


IDENTITY = Codec()

CODECS: dict[str, type[Codec]] = {"identity": Codec}


def make_codec(name: str, **kwargs: Any) -> Codec:
    """Build a codec by name; unknown names list the valid ones."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose from {sorted(CODECS)}")
    return CODECS[name](**kwargs)
