"""FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
(https://arxiv.org/abs/1812.06127). FedDM-prox in Vora et al. 2024 (https://arxiv.org/abs/2407.14730).

Server side: FedAvg plus the proximal weight mu in every task. Client side (:class:`ProxTerm`): the
local objective becomes L(w) + (mu/2)||w - w_global||^2, whose gradient term mu (w - w_global) is added
to every step's gradient before clipping. (The FedPhD reference code computes this term but never adds
it to the loss, so its "FedProx" is FedAvg; here the term really acts.)
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from feddiff.algorithms.base import ClientHook, Task
from feddiff.algorithms.fedavg import FedAvg
from feddiff.algorithms.registry import Algorithm, register
from feddiff.client.train import LocalTerm
from feddiff.config import F, AlgorithmConfig
from feddiff.types import StateDict


class FedProxConfig(AlgorithmConfig):
    """FedProx (Li et al. 2020): FedAvg plus a proximal term; FedDM-prox in Vora et al. (2024)."""

    name: Literal["fedprox"] = F("fedprox", "algorithm: fedprox")
    mu: float = F(0.01, "proximal weight: local loss + (mu/2)||w - w_global||^2", ge=0)


class FedProx(FedAvg):
    """FedAvg with ``prox_mu`` in each client's task."""

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        if cfg.mu == 0:
            warnings.warn("FedProx with mu=0 is FedAvg", stacklevel=2)

    def client_config(self, rnd: int) -> dict:
        return {**super().client_config(rnd), "prox_mu": float(self.cfg.mu)}


class ProxTerm(LocalTerm):
    """The proximal pull: adds mu (w - w_anchor) to each parameter's gradient, exactly.

    Parameters
    ----------
    mu
        The proximal weight.
    anchor
        The weights the round started from (the received global model), by parameter name.
    """

    def __init__(self, mu: float, anchor: StateDict):
        self.mu = mu
        self.anchor = anchor
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start(self, names: list[str], params: list[torch.nn.Parameter]) -> None:
        missing = [n for n in names if n not in self.anchor]
        if missing:
            raise ValueError(f"the proximal term's anchor (the received weights) lacks {len(missing)} parameters, "
                             f"e.g. {missing[:3]}")
        self.pairs = [(p, self.anchor[n].to(p.device)) for n, p in zip(names, params)]

    def grad(self) -> None:
        for p, p0 in self.pairs:
            p.grad.add_(p.detach() - p0, alpha=self.mu)

    def metrics(self) -> dict[str, float]:
        with torch.no_grad():
            return {"prox_dist2": float(sum(((p - p0) ** 2).sum() for p, p0 in self.pairs))}


class FedProxClient(ClientHook):
    """FedProx on the client: the proximal term around the weights received this round."""

    config_keys = frozenset({"prox_mu"})

    def terms(self, task: Task, state) -> list[LocalTerm]:
        mu = float(task.config.get("prox_mu", 0.0))
        return [ProxTerm(mu, task.tensors)] if mu > 0 else []


register(Algorithm("fedprox", FedProxConfig, FedProx, FedProxClient))
