"""FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
(https://arxiv.org/abs/1812.06127). FedDM-prox in Vora et al. 2024 (https://arxiv.org/abs/2407.14730).

Server side: FedAvg plus the proximal weight mu in every task. Client side (``client/train.py``):
the local objective becomes L(w) + (mu/2)||w - w_global||^2, whose gradient term mu (w - w_global)
is added to every step's gradient before clipping. (The FedPhD reference code computes this term
but never adds it to the loss, so its "FedProx" is FedAvg; here the term really acts.)
"""

from __future__ import annotations

import warnings

from feddiff.algorithms.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg with ``prox_mu`` in each client's task."""

    def __init__(self, cfg, num_clients: int, seed: int):
        super().__init__(cfg, num_clients, seed)
        if cfg.mu == 0:
            warnings.warn("FedProx with mu=0 is FedAvg", stacklevel=2)

    def client_config(self, rnd: int) -> dict:
        return {**super().client_config(rnd), "prox_mu": float(self.cfg.mu)}
