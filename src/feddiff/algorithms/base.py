"""The strategy interface: what the server side of every algorithm implements.

The engines own the round loop (written once, in ``engines/``); a strategy only says what to
send to whom (:meth:`Strategy.configure`) and how to combine what came back
(:meth:`Strategy.aggregate`). Strategies never serialize, count bytes or train: the transport
does the former, the client runtime (``client/runtime.py``) the latter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from feddiff.algorithms.aggregate import clone_state
from feddiff.seeding import numpy_rng

StateDict = dict[str, torch.Tensor]


@dataclass
class Task:
    """Server -> client: tensors to load, and JSON-able instructions for the client runtime.

    Keys of ``config`` the runtime understands: ``round`` (int), ``upload`` ("all" or a list of
    parameter-group names), ``personal`` (keep a persistent local model and load the received
    tensors over it), ``prox_mu`` (FedProx). Unknown keys are errors on the client.
    """

    client: int
    tensors: StateDict
    config: dict[str, Any] = field(default_factory=dict)
    link: str = "client-server"


@dataclass
class Reply:
    """Client -> server: the uploaded tensors, the client's sample count and training metrics."""

    client: int
    tensors: StateDict
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy:
    """Base class holding the global model and seeded client sampling.

    Parameters
    ----------
    cfg
        The algorithm section of the config (``fraction``, ``min_clients`` and the algorithm's own fields).
    num_clients
        Number of clients K.
    seed
        Root seed; client sampling in round r depends only on (seed, r).
    """

    personalized: ClassVar[bool] = False  # clients keep personal models that are evaluated one by one

    def __init__(self, cfg: Any, num_clients: int, seed: int):
        self.cfg = cfg
        self.num_clients = num_clients
        self.seed = seed
        self.global_model: StateDict = {}

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self, initial: StateDict) -> None:
        """Take the initial global model (the server owns its copy)."""
        self.global_model = clone_state(initial)

    def sample_clients(self, rnd: int) -> list[int]:
        """floor(fraction * K) clients (at least min_clients), uniformly without replacement."""
        k = self.num_clients
        m = min(k, max(self.cfg.min_clients, int(self.cfg.fraction * k + 1e-9)))
        if m == k:
            return list(range(k))
        return sorted(int(c) for c in numpy_rng(self.seed, "sample", rnd).choice(k, m, replace=False))

    def configure(self, rnd: int) -> list[Task]:
        raise NotImplementedError

    def aggregate(self, rnd: int, replies: list[Reply]) -> dict[str, float]:
        raise NotImplementedError

    # -- what evaluation and export see ----------------------------------------------------
    def global_state(self) -> StateDict:
        """The model to evaluate and export."""
        return self.global_model

    def personal_model(self, personal: StateDict) -> StateDict:
        """For personalized strategies: the model a client holding ``personal`` would evaluate."""
        raise NotImplementedError(f"{type(self).__name__} has no personal models")

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        """Tensors and JSON-able state needed to resume exactly."""
        return {f"global/{k}": v for k, v in self.global_model.items()}, {}

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        self.global_model = {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}
