"""In-process links: every message is serialized to real bytes, counted, and parsed back.

The simulator passes every task and reply through here, so the ledger sees exactly the bytes a
distributed engine would send, and a decoder bug shows up in the simulator too. Compression
(``compress/channel.py``) happens here, on the sending side, for whatever the strategy sends.

State kept per link end, and checkpointed: the server's record of each client's copy (downlink
delta mode); on the client, its copy (``rx/``) and its error-feedback residual (``ef/``).
"""

from __future__ import annotations

import torch

from feddiff.client.runtime import ClientState
from feddiff.compress.channel import LinkSpec, decode_message, encode_message
from feddiff.compress.wire import Message
from feddiff.metrics.ledger import Ledger
from feddiff.seeding import torch_generator

StateDict = dict[str, torch.Tensor]


def _with_prefix(tensors: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class LocalTransport:
    def __init__(self, ledger: Ledger, down: LinkSpec | None = None, up: LinkSpec | None = None, seed: int = 0):
        self.ledger = ledger
        self.down = down or LinkSpec()
        self.up = up or LinkSpec()
        self.seed = seed
        self.copies: dict[str, StateDict] = {}  # server side: what each node holds (downlink delta)

    def _generator(self, direction: str, rnd: int, node: str) -> torch.Generator:
        return torch_generator("cpu", self.seed, "codec", direction, rnd, node)

    def to_client(self, link: str, node: str, msg: Message, client: ClientState, rnd: int) -> Message:
        """Server -> client: encode (delta against the client's copy if so configured), count, decode."""
        spec = self.down
        delta = spec.mode == "delta"
        blob, _ = encode_message(msg, spec, self.copies.get(node) if delta else None,
                                 generator=self._generator("down", rnd, node))
        self.ledger.record(link, "down", node, len(blob))
        out = decode_message(blob, _with_prefix(client.tensors, "rx/") if delta else None)
        if delta:
            # both ends now hold the decoded tensors (the server decodes its own bytes identically)
            self.copies.setdefault(node, {}).update({k: v.clone() for k, v in out.tensors.items()})
            client.tensors.update({f"rx/{k}": v.clone() for k, v in out.tensors.items()})
        return out

    def to_server(self, link: str, node: str, msg: Message, received: StateDict, client: ClientState,
                  rnd: int) -> Message:
        """Client -> server: delta against what this round delivered, with error feedback if set."""
        spec = self.up
        blob, residual = encode_message(msg, spec, received, _with_prefix(client.tensors, "ef/"),
                                        generator=self._generator("up", rnd, node))
        self.ledger.record(link, "up", node, len(blob))
        if residual is not None:
            client.tensors.update({f"ef/{k}": v for k, v in residual.items()})
        return decode_message(blob, received)  # the server adds what it sent this round

    def state_dict(self) -> StateDict:
        return {f"{node}/{k}": v for node, copy in self.copies.items() for k, v in copy.items()}

    def load_state_dict(self, tensors: StateDict) -> None:
        self.copies = {}
        for key, v in tensors.items():
            node, k = key.split("/", 1)
            self.copies.setdefault(node, {})[k] = v
