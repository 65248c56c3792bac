"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (https://arxiv.org/abs/1602.05629).

Whole-model averaging weighted by client sample counts n_k:  w <- sum_k n_k w_k / sum_k n_k.
It is FULL in de Goede et al. (2024) and FedDM-vanilla in Vora et al. (2024).
"""

from __future__ import annotations

from typing import Literal

from feddiff.algorithms.aggregate import weighted_mean
from feddiff.algorithms.base import Failure, Reply, Strategy, Task
from feddiff.algorithms.registry import Algorithm, register
from feddiff.config import F, AlgorithmConfig


class FedAvgConfig(AlgorithmConfig):
    """FedAvg (McMahan et al. 2017) on the whole U-Net: FULL in de Goede et al., FedDM-vanilla."""

    name: Literal["fedavg"] = F("fedavg", "algorithm: fedavg")


class FedAvg(Strategy):
    """Send the global model to the sampled clients, average their full models by sample count."""

    def configure(self, rnd: int) -> list[Task]:
        return [Task(c, self.global_model, self.client_config(rnd)) for c in self.sample_clients(rnd)]

    def client_config(self, rnd: int) -> dict:
        """Instructions for the client runtime; variants (FedProx) add theirs here."""
        return {"round": rnd, "upload": "all"}

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        self.global_model = weighted_mean([r.tensors for r in replies], [r.num_samples for r in replies])
        return {}


register(Algorithm("fedavg", FedAvgConfig, FedAvg))
