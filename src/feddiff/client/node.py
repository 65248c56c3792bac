"""One client's handling of a message, bytes in and bytes out: decode, answer or train, encode.

This is everything a client process does with what the server sends; the simulator calls it in-process
for each client in turn, a Flower ClientApp calls it in its node. The client's whole state is its
:class:`~feddiff.client.runtime.ClientState` record, passed in and updated in place.

Two kinds of message arrive: a task (header ``config``: train, reply with the model section and extras),
and a query (header ``query``: a list of facts the server asks for before training, e.g. the label
histogram a strategy declared it needs, or the feature sums of federated reference statistics). Whatever
is answered travels through the uplink and is counted like any other message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from feddiff.algorithms.base import Task
from feddiff.client.runtime import ClientRuntime, ClientState
from feddiff.compress.link import ClientLink, pack, unpack
from feddiff.compress.wire import Message
from feddiff.model.spec import ModelSpec, SpecError
from feddiff.prune.structure import index_maps, restructure
from feddiff.types import StateDict, client_node


@dataclass
class ClientData:
    """A client's own data: uint8 images (N, C, H, W) and, when known, their labels."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    num_classes: int = 0


QUERY_ROUND = -1  # the round number of setup queries (their codec streams differ from every round's)
# the query for a client's personal model (UDEC/ULATDEC), when the engine keeps no client records (Flower)
PERSONAL_QUERY = "personal_model"


class ClientNode:
    """A client's message handler.

    Parameters
    ----------
    runtime
        Local training.
    link
        The client's half of the link (codecs, its copy and residual).
    answers
        name -> ``answer(data) -> tensors`` for queries beyond the built-in ``label_histogram``
        (the simulator adds ``feature_sums`` when federated reference statistics are on).
    """

    def __init__(self, runtime: ClientRuntime, link: ClientLink,
                 answers: dict[str, Callable[[ClientData], StateDict]] | None = None):
        self.runtime = runtime
        self.link = link
        self.answers: dict[str, Callable[[ClientData], StateDict]] = {"label_histogram": label_histogram}
        self.answers.update(answers or {})

    def handle(self, client: int, blob: bytes, state: ClientState, data: ClientData,
               progress: Callable[[], None] | None = None) -> bytes:
        """Answer one message from the server; returns the reply's bytes."""
        msg = self.link.receive(blob, state.tensors)
        meta: dict[str, Any] = msg.meta
        if "spec" in meta and meta["spec"] != state.spec:
            self._new_architecture(state, ModelSpec.from_json(meta["spec"]))
            state.spec = meta["spec"]
        if "query" in meta:
            return self._answer(client, meta["query"], state, data)
        tensors, extras = unpack(msg.tensors)
        task = Task(client, tensors, meta["config"], extras=extras)
        reply = self.runtime.handle(task, state, data.images, progress)
        out = Message(pack(reply.tensors, reply.extras), {"num_samples": reply.num_samples, "metrics": reply.metrics})
        return self.link.send(out, state.tensors, msg.tensors, int(task.config["round"]), client_node(client))

    def _new_architecture(self, state: ClientState, new: ModelSpec) -> None:
        """The server changed the model's architecture (pruned it): bring this client's record along.

        Everything named like a parameter (personal model, control variates, error-feedback residual) is
        pruned with the server's indices; the copy the message just delivered already has the new shapes.
        The optimizer restarts, as FedPhD's code does after pruning. A spec that does not extend this
        client's (another base model) is refused: the task fails and the record stays as it was.
        """
        old = self.runtime.model_spec(state)
        if state.personal is not None or any(not k.startswith("rx/") for k in state.tensors):
            try:
                maps = index_maps(old, new)
            except SpecError as err:
                raise ValueError(f"the server's model spec {new.id} cannot replace this client's {old.id}: {err}") from None
            state.personal = restructure(state.personal, maps) if state.personal is not None else None
            state.tensors = restructure(state.tensors, maps)
        state.optimizer = None

    def _answer(self, client: int, names: list[str], state: ClientState, data: ClientData) -> bytes:
        unknown = [n for n in names if n not in self.answers and n != PERSONAL_QUERY]
        if unknown:
            raise ValueError(f"client {client}: unknown query {unknown}; known: {sorted(self.answers)}")
        tensors: StateDict = {}
        for name in names:
            got = (state.personal or {}) if name == PERSONAL_QUERY else self.answers[name](data)
            tensors.update({f"{name}/{k}" if k else name: v for k, v in got.items()})
        # answers are statistics the server uses as they are: never through the uplink's lossy codec
        return self.link.send_exact(Message(tensors, {"num_samples": int(data.images.shape[0])}))


def label_histogram(data: ClientData) -> StateDict:
    """The client's count of each label (int64, length ``num_classes``): disclosed to the server."""
    if data.labels is None:
        raise ValueError("this client has no labels, so it cannot disclose a label histogram")
    return {"": torch.bincount(data.labels.long().cpu(), minlength=data.num_classes)}
