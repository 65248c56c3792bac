"""Algorithms: one module per paper algorithm, each registering itself (``registry.ALGORITHMS``)."""

from __future__ import annotations

from feddiff.algorithms import fedavg, fedphd, fedprox, hierarchical, scaffold, unet_split  # noqa: F401 - registers
from feddiff.algorithms.base import (
    ClientHook, Failure, Reply, Strategy, StrategyContext, StrategyWrapper, Task, Transfer,
)
from feddiff.algorithms.registry import (
    ALGORITHMS, WRAPPERS, Algorithm, Wrapper, client_hook, get_algorithm, make_strategy, register, register_wrapper,
    strategy_from,
)
from feddiff.algorithms import ema as _ema_wrapper  # noqa: F401, E402 - registers the [ema] wrapper
from feddiff.algorithms import dp as _dp_wrapper  # noqa: F401, E402 - registers the [dp] wrapper
from feddiff.algorithms import robust as _robust_wrapper  # noqa: F401, E402 - registers the [robust] wrapper
from feddiff.prune import wrapper as _prune_wrapper  # noqa: F401, E402 - registers the [prune] wrapper

__all__ = ["ALGORITHMS", "WRAPPERS", "Algorithm", "Wrapper", "register_wrapper", "ClientHook", "Failure", "Reply", "Strategy", "StrategyContext",
           "StrategyWrapper", "Task", "Transfer", "client_hook", "get_algorithm", "make_strategy", "register",
           "strategy_from"]
