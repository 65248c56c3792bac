"""Algorithms: one module per paper algorithm; ``STRATEGIES`` maps config names to classes."""

from __future__ import annotations

from typing import Any

from feddiff.algorithms.base import Reply, Strategy, Task
from feddiff.algorithms.fedavg import FedAvg
from feddiff.algorithms.fedprox import FedProx
from feddiff.algorithms.unet_split import UDec, ULatDec, USplit

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "usplit": USplit,
    "udec": UDec,
    "ulatdec": ULatDec,
}


def make_strategy(cfg: Any, num_clients: int, seed: int) -> Strategy:
    """Build the strategy named by ``cfg.name``."""
    if cfg.name not in STRATEGIES:
        raise ValueError(f"unknown algorithm {cfg.name!r}; choose from {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.name](cfg, num_clients, seed)


__all__ = ["STRATEGIES", "Reply", "Strategy", "Task", "make_strategy"]
