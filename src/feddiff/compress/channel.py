"""Compressed links: what is encoded (weights or deltas), with which codec, and error feedback.

This wraps every algorithm's messages without the algorithm knowing: strategies produce and
consume full-precision tensors; the transport calls :func:`encode_message` on the sending side and
:func:`decode_message` on the receiving side.

- ``mode="weights"``: the tensors themselves go through the codec.
- ``mode="delta"``: floating tensors travel as differences from a reference both sides hold (uplink:
  the tensors the client received this round; downlink: the server's record of the client's copy,
  which equals the client's copy because decoding is deterministic). A quantized downlink delta
  corrects itself: next round's delta is taken against the copy the client really has.
- ``error_feedback`` (delta only): the sender keeps what quantization dropped and adds it to its
  next message (Seide et al. 2014; Karimireddy et al. 2019), so errors do not accumulate.

FedDM-quant (Vora et al. 2024) is the uplink in delta mode with an int8 codec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from feddiff.compress import wire
from feddiff.compress.codecs import IDENTITY, Codec
from feddiff.compress.wire import Message, MessageError

from feddiff.types import StateDict

MODES = ("weights", "delta")


@dataclass(frozen=True)
class LinkSpec:
    """How one direction of a link is encoded."""

    codec: Codec = IDENTITY
    mode: str = "weights"
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"compress mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.error_feedback and self.mode != "delta":
            raise ValueError("error_feedback needs mode='delta' (it feeds back quantization error of updates)")


def delta_keys(tensors: StateDict, reference: StateDict | None) -> list[str]:
    """The floating tensors that can travel as deltas: the reference holds them with the same shape.

    Anything else (a client's first message, an extra the reference lacks, a tensor whose shape changed
    because the model was pruned) travels as weights.
    """
    if reference is None:
        return []
    return [k for k, v in tensors.items()
            if v.is_floating_point() and k in reference and tuple(reference[k].shape) == tuple(v.shape)]


def encode_message(
    msg: Message, spec: LinkSpec, reference: StateDict | None = None, residual: StateDict | None = None,
    generator: torch.Generator | None = None,
) -> tuple[bytes, StateDict | None]:
    """Serialize ``msg`` for the wire; returns (bytes, the sender's new error-feedback residual).

    In delta mode every floating tensor that ``reference`` holds with the same shape travels as its
    difference from the reference; the header says which (``delta``: true for all floating tensors, a
    list of names for some). A residual whose shape no longer matches is dropped, never applied.
    """
    floats = [k for k, v in msg.tensors.items() if v.is_floating_point()]
    keys = delta_keys(msg.tensors, reference) if spec.mode == "delta" else []
    if not keys:
        return wire.encode(Message(msg.tensors, {**msg.meta, "delta": False}), spec.codec, generator), None
    as_delta = set(keys)
    payload = {}
    for k, v in msg.tensors.items():
        if k in as_delta:
            d = v.detach().cpu() - reference[k].detach().cpu()
            r = residual.get(k) if (spec.error_feedback and residual is not None) else None
            if r is not None and r.shape == d.shape:
                d = d + r
            payload[k] = d
        else:
            payload[k] = v
    marker: bool | list[str] = True if len(keys) == len(floats) else keys
    blob = wire.encode(Message(payload, {**msg.meta, "delta": marker}), spec.codec, generator)
    new_residual = None
    if spec.error_feedback:
        # what the receiver will reconstruct, exactly: decode our own bytes
        sent = wire.decode(blob).tensors
        new_residual = {k: payload[k] - sent[k] for k in keys}
    return blob, new_residual


def decode_message(blob: bytes, reference: StateDict | None = None) -> Message:
    """Parse bytes from :func:`encode_message`; delta tensors are added to ``reference``."""
    msg = wire.decode(blob)
    marker = msg.meta.pop("delta", False)
    if marker is False:
        return msg
    if marker is True:
        as_delta = {k for k, v in msg.tensors.items() if v.is_floating_point()}
    elif isinstance(marker, list) and all(isinstance(k, str) and k in msg.tensors for k in marker):
        as_delta = set(marker)
    else:
        raise MessageError(f"header field 'delta' must be true, false or a list of the message's tensor names, "
                           f"got {marker!r:.200}")
    if reference is None:
        raise MessageError("a delta message arrived but the receiver holds no reference to add it to")
    out = {}
    for k, v in msg.tensors.items():
        if k in as_delta:
            if not v.is_floating_point():
                raise MessageError(f"delta for {k!r} is not a floating tensor ({v.dtype})")
            if k not in reference:
                raise MessageError(f"delta for {k!r} but the receiver's reference has no such tensor")
            ref = reference[k]
            if tuple(ref.shape) != tuple(v.shape):
                raise MessageError(f"delta for {k!r} has shape {list(v.shape)}, the receiver's reference "
                                   f"{list(ref.shape)}")
            out[k] = (ref.detach().cpu() + v).to(ref.dtype)
        else:
            out[k] = v
    return Message(out, msg.meta)
