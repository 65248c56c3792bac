"""In-process links: every message is serialized to real bytes, counted, and parsed back.

The simulator passes every task and reply through here, so the ledger sees exactly the bytes a
distributed engine would send, and a decoder bug shows up in the simulator too.
"""

from __future__ import annotations

from feddiff.compress import wire
from feddiff.compress.codecs import IDENTITY, Codec
from feddiff.metrics.ledger import Ledger


class LocalTransport:
    def __init__(self, ledger: Ledger, down: Codec = IDENTITY, up: Codec = IDENTITY):
        self.ledger = ledger
        self.codecs = {"down": down, "up": up}

    def send(self, link: str, direction: str, node: str, message: wire.Message) -> wire.Message:
        """Encode, count ``len(bytes)`` on ``link``/``direction`` for ``node``, decode."""
        blob = wire.encode(message, self.codecs[direction])
        self.ledger.record(link, direction, node, len(blob))
        return wire.decode(blob)
