"""The communication ledger: the real serialized length of every message, per link and direction.

Links are named by their tiers: ``client-server`` now, ``client-edge`` and ``edge-cloud`` for
hierarchies. ``down`` is toward the clients, ``up`` toward the server. Nothing here estimates
from parameter counts: the transport passes ``len(bytes)`` of what it sent.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

DIRECTIONS = ("down", "up")
EVAL_LINK = "eval"  # what evaluation asks of clients: counted, but not training traffic


def training_bytes(by_link: dict[str, dict[str, int]]) -> dict[str, int]:
    """Bytes per link, up + down, of a ledger summary (``bytes`` or ``bytes_cumulative`` of a round's
    record) without the evaluation link."""
    return {link: int(d.get("up", 0) + d.get("down", 0)) for link, d in by_link.items() if link != EVAL_LINK}


class Ledger:
    def __init__(self) -> None:
        self.cumulative: dict[str, dict[str, int]] = {}
        self.messages: dict[str, dict[str, int]] = {}
        self._round: list[tuple[str, str, str, int]] = []

    def record(self, link: str, direction: str, node: str, nbytes: int) -> None:
        """One message of ``nbytes`` bytes on ``link`` to (down) or from (up) ``node``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self._round.append((link, direction, node, int(nbytes)))

    def close_round(self) -> dict[str, Any]:
        """Summarise the round's messages and add them to the running totals."""
        per_link: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(DIRECTIONS, 0))
        per_node: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
        for link, direction, node, n in self._round:
            per_link[link][direction] += n
            per_node[link].setdefault(node, dict.fromkeys(DIRECTIONS, 0))[direction] += n
            cum = self.cumulative.setdefault(link, dict.fromkeys(DIRECTIONS, 0))
            cum[direction] += n
            msg = self.messages.setdefault(link, dict.fromkeys(DIRECTIONS, 0))
            msg[direction] += 1
        self._round = []
        return {
            "bytes": {k: dict(v) for k, v in per_link.items()},
            "bytes_per_node": {k: dict(v) for k, v in per_node.items()},  # link -> node -> direction
            "bytes_cumulative": {k: dict(v) for k, v in self.cumulative.items()},
            "bytes_total_cumulative": sum(sum(v.values()) for v in self.cumulative.values()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"cumulative": self.cumulative, "messages": self.messages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cumulative = {k: dict(v) for k, v in state["cumulative"].items()}
        self.messages = {k: dict(v) for k, v in state["messages"].items()}
        self._round = []
