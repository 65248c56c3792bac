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

StateDict = dict[str, torch.Tensor]
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


def encode_message(
    msg: Message, spec: LinkSpec, reference: StateDict | None = None, residual: StateDict | None = None,
    generator: torch.Generator | None = None,
) -> tuple[bytes, StateDict | None]:
    """Serialize ``msg`` for the wire; returns (bytes, the sender's new error-feedback residual).

    In delta mode ``reference`` must hold every floating tensor of the message; when it does not
    (a client's first message), the message goes as weights and says so in its header.
    """
    floats = [k for k, v in msg.tensors.items() if v.is_floating_point()]
    delta = spec.mode == "delta" and reference is not None and all(k in reference for k in floats)
    if not delta:
        return wire.encode(Message(msg.tensors, {**msg.meta, "delta": False}), spec.codec, generator), None
    payload = {}
    for k, v in msg.tensors.items():
        if k in floats:
            d = v.detach().cpu() - reference[k].detach().cpu()
            if spec.error_feedback and residual is not None and k in residual:
                d = d + residual[k]
            payload[k] = d
        else:
            payload[k] = v
    blob = wire.encode(Message(payload, {**msg.meta, "delta": True}), spec.codec, generator)
    new_residual = None
    if spec.error_feedback:
        # what the receiver will reconstruct, exactly: decode our own bytes
        sent = wire.decode(blob).tensors
        new_residual = {k: payload[k] - sent[k] for k in floats}
    return blob, new_residual


def decode_message(blob: bytes, reference: StateDict | None = None) -> Message:
    """Parse bytes from :func:`encode_message`; delta messages are added to ``reference``."""
    msg = wire.decode(blob)
    is_delta = bool(msg.meta.pop("delta", False))
    if not is_delta:
        return msg
    if reference is None:
        raise MessageError("a delta message arrived but the receiver holds no reference to add it to")
    out = {}
    for k, v in msg.tensors.items():
        if v.is_floating_point():
            if k not in reference:
                raise MessageError(f"delta for {k!r} but the receiver's reference has no such tensor")
            ref = reference[k]
            out[k] = (ref.detach().cpu() + v).to(ref.dtype)
        else:
            out[k] = v
    return Message(out, msg.meta)
