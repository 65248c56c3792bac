"""The message container: named tensors + a small JSON header, as bytes; validated on decode.

Layout::

    b"FDM" | version (1 byte) | crc32 of the rest (4 bytes, little-endian) | safetensors blob

The safetensors blob holds every storage tensor and, in its string metadata, the header: the
codec, the message's scalar fields, and per tensor its name, shape, dtype and codec parameters.
Nothing is unpickled. Truncated, corrupted or inconsistent bytes raise :class:`MessageError`.
The ledger counts ``len()`` of these bytes: header and framing included.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from feddiff.compress.codecs import IDENTITY, Codec, CodecError, make_codec

MAGIC = b"FDM"
VERSION = 1
_PREFIX = 8  # magic + version + crc32

StateDict = dict[str, torch.Tensor]


class MessageError(ValueError):
    """Bytes that are not a valid feddiff message: the reason is in the text."""


@dataclass
class Message:
    """What travels on one link: named tensors plus JSON-able fields (round, config, counts)."""

    tensors: StateDict
    meta: dict[str, Any] = field(default_factory=dict)


_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
)}  # fmt: skip


def encode(message: Message, codec: Codec = IDENTITY, generator: torch.Generator | None = None) -> bytes:
    """Serialize a message; floating-point tensors go through ``codec``, others travel as they are."""
    storage: dict[str, torch.Tensor] = {}
    index = []
    for name, x in message.tensors.items():
        if "#" in name:
            raise MessageError(f"tensor name {name!r} may not contain '#'")
        c = codec if x.is_floating_point() else IDENTITY
        parts, params = c.encode(x.detach().cpu(), generator)
        for suffix, t in parts.items():
            storage[f"{name}#{suffix}"] = t.contiguous()
        index.append([name, list(x.shape), str(x.dtype).removeprefix("torch."), c.name, params, sorted(parts)])
    header = {
        "codec": codec.name,
        "codec_config": json.dumps(codec.config()),
        "meta": json.dumps(message.meta),
        "index": json.dumps(index),
    }
    body = st_save(storage, metadata=header)
    return MAGIC + bytes([VERSION]) + zlib.crc32(body).to_bytes(4, "little") + body


def decode(blob: bytes) -> Message:
    """Parse and validate bytes made by :func:`encode`."""
    if len(blob) < _PREFIX or blob[:3] != MAGIC:
        raise MessageError(f"not a feddiff message ({len(blob)} bytes, starts {bytes(blob[:4])!r})")
    if blob[3] != VERSION:
        raise MessageError(f"message format version {blob[3]} is not supported (expected {VERSION})")
    body = blob[_PREFIX:]
    if zlib.crc32(body) != int.from_bytes(blob[4:8], "little"):
        raise MessageError(f"message checksum mismatch ({len(blob)} bytes): truncated or corrupted")
    try:
        storage = st_load(body)
        header = _read_metadata(body)
        index = json.loads(header["index"])
        meta = json.loads(header["meta"])
        codec_config = json.loads(header["codec_config"])
    except (SafetensorError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MessageError(f"malformed message body: {err}") from None
    tensors: StateDict = {}
    used = set()
    for entry in index:
        try:
            name, shape, dtype_name, codec_name, params, suffixes = entry
            dtype = _DTYPES[dtype_name]
            codec = IDENTITY if codec_name == "identity" else make_codec(codec_name, **codec_config)
            parts = {s: storage[f"{name}#{s}"] for s in suffixes}
            x = codec.decode(parts, params, shape, dtype)
        except (ValueError, KeyError, TypeError, CodecError) as err:
            raise MessageError(f"tensor {entry[0] if entry else '?'!r}: {err}") from None
        if list(x.shape) != list(shape):
            raise MessageError(f"tensor {name!r}: decoded shape {list(x.shape)} != header {shape}")
        used.update(f"{name}#{s}" for s in suffixes)
        tensors[name] = x
    extra = set(storage) - used
    if extra:
        raise MessageError(f"message has storage not named in its header: {sorted(extra)[:5]}")
    return Message(tensors, meta)


def _read_metadata(body: bytes) -> dict[str, str]:
    n = int.from_bytes(body[:8], "little")
    head = json.loads(body[8 : 8 + n])
    return head["__metadata__"]
