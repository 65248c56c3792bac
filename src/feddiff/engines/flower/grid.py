"""The engine over Flower's ``Grid``: feddiff's bytes in Flower messages, replies as they arrive.

``send_and_receive`` pushes one Flower message per task (our frame as a ``bytes`` value of a
``ConfigRecord``: the ledger counts exactly what the simulator counts) and pulls replies, waiting
``poll_s`` between pulls at first and up to ``MAX_POLL_S`` while none arrives (Flower's own
``Grid.send_and_receive`` sleeps 3 s between pulls). A reply with a Flower
error (the ClientApp raised, the node went away) is that client's failure, like a raising client in the
simulator. Nodes are matched to clients by the ``partition-id`` in their node config, asked once with a
``query.hello`` message.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from feddiff.client.node import QUERY_ROUND
from feddiff.engines.flower.node import EDGE_ID, NUM_PARTITIONS, OWN_DATA, PARTITION_ID
from feddiff.engines.loop import Incoming, Outgoing, RoundEvents
from feddiff.engines.validate import MAX_CLAIMED_SAMPLES
from feddiff.runs import RunError
from feddiff.types import StateDict

from feddiff.engines.flower.protocol import HELLO, QUERY, ROLLBACK, SECTION, TRAIN  # noqa: E402


MAX_POLL_S = 0.5  # the longest wait between two pulls of replies (poll_s is the shortest)


def exchange(grid: Grid, messages: list[Message], poll_s: float, timeout_s: float | None,
             on_reply=lambda index, message: None) -> tuple[list[Message], list[int]]:
    """Push ``messages`` and pull until every one has a reply or ``timeout_s`` passes.

    Replies are matched to messages by the id they answer, never by their sender: errors the SuperLink
    makes itself (a node gone, a message expired) come from the SuperLink's own node id.
    Returns (replies, indices of the messages that got none).
    """
    ids = list(grid.push_messages(messages))
    wait = poll_s  # grows while nothing arrives (a long training costs the SuperLink few polls), back on a reply
    # a message the SuperLink did not store comes back with an empty id ("" in 1.42, None in older code)
    pending = {mid: i for i, mid in enumerate(ids) if mid}
    lost = [i for i, mid in enumerate(ids) if not mid]
    replies: list[Message] = []
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while pending and (end is None or time.monotonic() < end):
        got = list(grid.pull_messages(list(pending)))
        for reply in got:
            i = pending.pop(reply.metadata.reply_to_message_id, None)
            if i is not None:
                replies.append(reply)
                on_reply(i, reply)
        if got:
            wait = poll_s
        elif pending:
            time.sleep(wait)
            wait = min(wait * 1.5, max(poll_s, MAX_POLL_S))
    return replies, lost + sorted(pending.values())


def discover(grid: Grid, num_clients: int, wait_s: float = 300.0, poll_s: float = 0.1) -> dict[int, dict[str, Any]]:
    """Wait for ``num_clients`` nodes and ask each who it is; partition id -> {node, edge}."""
    end = time.monotonic() + wait_s
    while len(list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > end:
            raise RunError(f"only {len(list(grid.get_node_ids()))} of {num_clients} SuperNodes connected within "
                           f"{wait_s:.0f} s (partition.num_clients = {num_clients})")
        time.sleep(poll_s)
    nodes = sorted(grid.get_node_ids())
    hello = [Message(RecordDict(), dst_node_id=n, message_type=HELLO) for n in nodes]
    answers: dict[int, Message] = {}
    _, missing = exchange(grid, hello, poll_s, wait_s, lambda i, r: answers.__setitem__(nodes[i], r))
    if missing:
        raise RunError(f"SuperNodes {[nodes[i] for i in missing]} did not say which partition they hold")
    found: dict[int, dict[str, Any]] = {}
    for node, r in sorted(answers.items()):
        if r.has_error():
            raise RunError(f"SuperNode {node} could not say which partition it holds: {r.error.reason}")
        try:
            c = r.content[SECTION]
            pid, num = int(c[PARTITION_ID]), int(c[NUM_PARTITIONS])
        except (KeyError, TypeError, ValueError) as err:
            raise RunError(f"SuperNode {node} answered the hello without a partition ({err})") from None
        if num != num_clients:
            raise RunError(f"SuperNode {node} has {NUM_PARTITIONS}={num}; the run has partition.num_clients="
                           f"{num_clients}")
        if not 0 <= pid < num_clients:
            raise RunError(f"SuperNode {node} has {PARTITION_ID}={pid}, not in 0..{num_clients - 1}")
        if pid in found:
            raise RunError(f"SuperNodes {found[pid]['node']} and {node} both hold {PARTITION_ID}={pid}")
        found[pid] = {"node": node, "edge": str(c[EDGE_ID])}
        if OWN_DATA in c and c[OWN_DATA] is True:  # its own data: how much (the aggregation weight), what shape
            try:
                size, channels, classes = (c[k] for k in ("num-examples", "channels", "class-names"))
            except KeyError as err:
                raise RunError(f"SuperNode {node} holds its own data but did not say {err}") from None
            for key, value, top in (("num-examples", size, MAX_CLAIMED_SAMPLES), ("channels", channels, 4)):
                if type(value) is not int or not 1 <= value <= top:
                    raise RunError(f"SuperNode {node} declares {key}={value!r}; expected an integer in [1, {top}]")
            if not (isinstance(classes, list) and 1 <= len(classes) <= MAX_CLASSES
                    and all(type(x) is str and len(x) <= 256 for x in classes)):
                raise RunError(f"SuperNode {node} declares class-names={str(classes)[:80]}; expected a list of 1 to "
                               f"{MAX_CLASSES} names (strings of at most 256 characters)")
            found[pid].update(own=True, size=size, channels=channels, classes=tuple(classes))
    absent = sorted(set(range(num_clients)) - set(found))
    if absent:
        raise RunError(f"no SuperNode holds partitions {absent} (connected: {sorted(found)})")
    return found


MAX_CLASSES = 1 << 16  # class names a node with its own data may declare
ROLLBACK_WAIT_S = 300.0  # how long a rollback waits for the nodes' answers at least


class FlowerEngine:
    """:class:`~feddiff.engines.loop.Engine` over a Flower ``Grid`` (the clients keep their own records).

    Parameters
    ----------
    grid
        The ServerApp's grid.
    node_of
        Client (partition id) -> Flower node id.
    poll_s
        Seconds between pulls while replies are outstanding.
    timeout_s
        How long a round waits for replies (None: until every node answers or Flower reports an error).
    """

    def __init__(self, grid: Grid, node_of: dict[int, int], poll_s: float = 0.05, timeout_s: float | None = None):
        self.grid, self.node_of, self.poll_s, self.timeout_s = grid, dict(node_of), poll_s, timeout_s

    def send_and_receive(self, rnd: int, messages: list[Outgoing], events: RoundEvents) -> list[Incoming]:
        kind = QUERY if rnd == QUERY_ROUND else TRAIN
        # with a round timeout the message also expires then, so a node does not run it late; queries
        # (setup statistics, personal models for evaluation) are not rounds and wait
        timeout = self.timeout_s if rnd != QUERY_ROUND else None
        ttl = {"ttl": float(timeout)} if timeout else {}
        out = [Message(RecordDict({SECTION: ConfigRecord({"blob": m.blob, "round": rnd, "client": m.client})}),
                       dst_node_id=self.node_of[m.client], message_type=kind, **ttl) for m in messages]
        for i, m in enumerate(messages):
            events.start(m.client, i, len(messages))
        results: list[Incoming] = []

        def arrived(i: int, reply: Message) -> None:
            client = messages[i].client
            if reply.has_error():
                inc = Incoming(client, error=f"Flower error {reply.error.code}: {reply.error.reason}")
            else:
                try:
                    inc = Incoming(client, blob=bytes(reply.content[SECTION]["blob"]))
                except (KeyError, TypeError) as err:
                    inc = Incoming(client, error=f"a reply without feddiff's frame ({err})")
            results.append(inc)
            events.done(inc)

        _, lost = exchange(self.grid, out, self.poll_s, timeout, arrived)
        for i in lost:
            results.append(Incoming(messages[i].client, error="no reply (not delivered, or past the round's timeout)"))
        if lost and rnd != QUERY_ROUND:
            # a node may still finish a message past its deadline and keep that round's record: ask it to
            # go back (it answers once it is free; its round check makes this a no-op if it never ran)
            self.grid.push_messages(self._rollbacks(rnd, [messages[i].client for i in lost]))
        return results

    def rollback(self, rnd: int, clients: list[int], whole_round: bool = False) -> None:
        """Ask ``clients``' nodes to restore their records from before round ``rnd`` (it did not count, or
        they are asked again)."""
        out = self._rollbacks(rnd, clients)
        answered: set[int] = set()

        def arrived(i: int, reply: Message) -> None:
            if not reply.has_error() and reply.content[SECTION]["restored"]:
                answered.add(clients[i])

        exchange(self.grid, out, self.poll_s, max(self.timeout_s or 0.0, ROLLBACK_WAIT_S), arrived)
        for c in sorted(set(clients) - answered):
            print(f"warning: round {rnd + 1}: client {c}'s node did not restore its record from before the round "
                  "(no answer); its state keeps that round's update", file=sys.stderr, flush=True)

    def _rollbacks(self, rnd: int, clients: list[int]) -> list[Message]:
        return [Message(RecordDict({SECTION: ConfigRecord({"round": rnd})}), dst_node_id=self.node_of[c],
                        message_type=ROLLBACK) for c in clients]

    def personal_models(self) -> None:
        """The personal models are on the nodes: the server asks for them (``personal_model`` query)."""
        return None

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        """Nothing: every client keeps its record in its node's context."""
        return {}, {}

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        """Nothing to restore here (the records are on the nodes)."""
