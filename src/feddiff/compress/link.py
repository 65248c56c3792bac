"""The two halves of a link: what the server does with a message, and what a client does.

Every message is serialized to real bytes here, on the sending side, through the link's codec
(``compress/channel.py``), and parsed on the receiving side; the server half reports ``len(bytes)`` of
everything it sends or receives, so the ledger counts what crossed the network. The halves share no
object: in the simulator they run in one process, on Flower in different ones.

State each half keeps (and an engine checkpoints):

- server: its record of each node's decoded copy (downlink delta mode), ``copies[node]``; the model spec
  each node was last sent;
- client: its decoded copy (``rx/``) and its error-feedback residual (``ef/``), inside the client's one
  record, :class:`~feddiff.client.runtime.ClientState`.

A message has two sections on the wire: model tensors under their own names, algorithm extras under
``extra:<name>`` (U-Net parameter names never hold a colon).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from feddiff.compress.channel import LinkSpec, decode_message, encode_message
from feddiff.compress import wire
from feddiff.compress.wire import Message, MessageError
from feddiff.seeding import torch_generator
from feddiff.types import StateDict, under

EXTRA = "extra:"


def pack(tensors: StateDict, extras: StateDict) -> StateDict:
    """One flat payload of a message's model section and its extras."""
    return {**tensors, **{f"{EXTRA}{k}": v for k, v in extras.items()}}


def unpack(payload: StateDict) -> tuple[StateDict, StateDict]:
    """(model tensors, extras) of a payload from :func:`pack`."""
    tensors = {k: v for k, v in payload.items() if not k.startswith(EXTRA)}
    extras = {k[len(EXTRA):]: v for k, v in payload.items() if k.startswith(EXTRA)}
    return tensors, extras


def codec_generator(seed: int, direction: str, rnd: int, node: str) -> torch.Generator:
    """The stream of a message's stochastic rounding: both halves derive it from (seed, direction, round, node)."""
    return torch_generator("cpu", seed, "codec", direction, rnd, node)


@dataclass
class LinkSpecs:
    """How each direction of the client links is encoded."""

    down: LinkSpec = LinkSpec()
    up: LinkSpec = LinkSpec()


class ServerLink:
    """The server's half of its links to nodes.

    Parameters
    ----------
    specs
        Codec and mode of each direction.
    seed
        Root seed (stochastic rounding).
    record
        ``record(link, direction, node, nbytes)``: the ledger's entry for every message.
    """

    def __init__(self, specs: LinkSpecs, seed: int, record: Callable[[str, str, str, int], None]):
        self.specs = specs
        self.seed = seed
        self.record = record
        self.copies: dict[str, StateDict] = {}  # what each node holds (downlink delta mode)

    def send(self, link: str, node: str, msg: Message, rnd: int) -> tuple[bytes, StateDict]:
        """Encode a message to ``node`` (a delta against its copy if so configured) and count it.

        Returns the bytes and the tensors the node will decode from them (decoding is deterministic):
        the reference of the node's delta-encoded reply, and the server's record of its copy.
        """
        spec = self.specs.down
        delta = spec.mode == "delta"
        blob, _ = encode_message(msg, spec, self.copies.get(node) if delta else None,
                                 generator=codec_generator(self.seed, "down", rnd, node))
        self.record(link, "down", node, len(blob))
        delivered = msg.tensors  # a lossless weights message arrives as it was sent
        if delta or (spec.codec.lossy and self.specs.up.mode == "delta"):
            delivered = decode_message(blob, self.copies.get(node) if delta else None).tensors
        if delta:
            copy = self.copies.setdefault(node, {})
            copy.update({k: v.clone() for k, v in delivered.items() if v.is_floating_point()})
        return blob, delivered

    def receive(self, blob: bytes, delivered: StateDict) -> Message:
        """Decode a reply; deltas are added to ``delivered`` (see :meth:`send`). Count it with :meth:`count`."""
        return decode_message(blob, delivered)

    def count(self, link: str, direction: str, node: str, nbytes: int) -> None:
        """The ledger's entry for a message that crossed the link."""
        self.record(link, direction, node, nbytes)

    def transfer(self, link: str, direction: str, src: str, dst: str, msg: Message, rnd: int) -> Message:
        """Carry a message between two server tiers: encode it as weights with the direction's codec, count
        the bytes (at the lower tier's node), and return what the receiver decodes."""
        spec = self.specs.up if direction == "up" else self.specs.down
        node = src if direction == "up" else dst
        blob, _ = encode_message(msg, LinkSpec(spec.codec), None,
                                 generator=codec_generator(self.seed, f"{link}-{direction}", rnd, node))
        self.record(link, direction, node, len(blob))
        return decode_message(blob)

    def forget(self, node: str) -> None:
        """Drop the record of a node's copy (its next message goes as weights)."""
        self.copies.pop(node, None)

    def state_dict(self) -> StateDict:
        """The copies, as ``<node>/<tensor>``."""
        return {f"{node}/{k}": v for node, copy in self.copies.items() for k, v in copy.items()}

    def load_state_dict(self, tensors: StateDict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.copies = {}
        for key, v in tensors.items():
            node, k = key.split("/", 1)
            self.copies.setdefault(node, {})[k] = v


class ClientLink:
    """A client's half of its link to the server; its state lives in the client's record ``tensors``."""

    def __init__(self, specs: LinkSpecs, seed: int):
        self.specs = specs
        self.seed = seed

    def receive(self, blob: bytes, tensors: StateDict) -> Message:
        """Decode a message from the server; in downlink delta mode keep the decoded copy (``rx/``)."""
        delta = self.specs.down.mode == "delta"
        msg = decode_message(blob, under(tensors, "rx/") if delta else None)
        if delta:
            tensors.update({f"rx/{k}": v.clone() for k, v in msg.tensors.items() if v.is_floating_point()})
        return msg

    def send(self, msg: Message, tensors: StateDict, received: StateDict, rnd: int, node: str) -> bytes:
        """Encode a reply: deltas against what this round received, with error feedback (``ef/``) if set."""
        spec = self.specs.up
        for k, v in msg.tensors.items():  # a residual of another shape (the model was pruned) never applies again
            old = tensors.get(f"ef/{k}")
            if old is not None and tuple(old.shape) != tuple(v.shape):
                del tensors[f"ef/{k}"]
        blob, residual = encode_message(msg, spec, received, under(tensors, "ef/"),
                                        generator=codec_generator(self.seed, "up", rnd, node))
        if residual is not None:
            tensors.update({f"ef/{k}": v for k, v in residual.items()})
        return blob

    def send_exact(self, msg: Message) -> bytes:
        """Encode an answer that must arrive exactly (statistics, label counts): no codec, no delta."""
        return wire.encode(msg)


__all__ = ["EXTRA", "ClientLink", "LinkSpecs", "MessageError", "ServerLink", "pack", "unpack"]
