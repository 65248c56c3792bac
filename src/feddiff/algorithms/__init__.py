"""Algorithms: one module per paper algorithm, each registering itself (``registry.ALGORITHMS``)."""

from __future__ import annotations

from feddiff.algorithms import fedavg, fedphd, fedprox, hierarchical, scaffold, unet_split  # noqa: F401 - registers
from feddiff.algorithms.base import (
    ClientHook, Failure, Reply, Strategy, StrategyContext, StrategyWrapper, Task, Transfer,
)
from feddiff.algorithms.registry import (
    ALGORITHMS, Algorithm, client_hook, get_algorithm, make_strategy, register, strategy_from,
)

__all__ = ["ALGORITHMS", "Algorithm", "ClientHook", "Failure", "Reply", "Strategy", "StrategyContext",
           "StrategyWrapper", "Task", "Transfer", "client_hook", "get_algorithm", "make_strategy", "register",
           "strategy_from"]
