"""One registration per algorithm: its config section, its strategy (server half), its client hook.

``register(Algorithm(...))`` at the bottom of an algorithm's module is all it takes for the config
(``[algorithm] name = ...`` and its fields), ``feddiff config``, both engines and the CLI to know it.
Wrappers (DP, EMA, robust aggregation) are composed around any strategy by :func:`make_strategy`,
which sees the whole config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from feddiff.algorithms.base import ClientHook, Strategy, StrategyContext


@dataclass(frozen=True)
class Algorithm:
    """An algorithm as the rest of feddiff sees it."""

    name: str
    config: type  # a subclass of feddiff.config.AlgorithmConfig with ``name: Literal[<name>]``
    strategy: type[Strategy]
    client: type[ClientHook] = ClientHook


ALGORITHMS: dict[str, Algorithm] = {}

# (name, wrap): ``wrap(strategy, cfg)`` returns the strategy wrapped, or unchanged when its section is off
WRAPPERS: list[tuple[str, Callable[[Strategy, Any], Strategy]]] = []


def register(entry: Algorithm) -> Algorithm:
    """Add an algorithm; a second registration of a name is an error (two modules claim it)."""
    if entry.name in ALGORITHMS and ALGORITHMS[entry.name] != entry:
        raise ValueError(f"algorithm {entry.name!r} is registered twice")
    ALGORITHMS[entry.name] = entry
    return entry


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm ``name``; an unknown name lists the valid ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def make_strategy(cfg: Any, context: StrategyContext) -> Strategy:
    """The strategy of ``cfg.algorithm``, with every configured wrapper composed around it.

    Parameters
    ----------
    cfg
        The whole run config (wrappers read their own sections).
    context
        The federation: number of clients, seed, model spec, client sizes.
    """
    strategy = get_algorithm(cfg.algorithm.name).strategy(cfg.algorithm, context)
    for _, wrap in WRAPPERS:
        strategy = wrap(strategy, cfg)
    return strategy


def strategy_from(algorithm_cfg: Any, num_clients: int, seed: int) -> Strategy:
    """A bare strategy from an algorithm section alone (tests, notebooks): no wrappers, no spec."""
    return get_algorithm(algorithm_cfg.name).strategy(algorithm_cfg, StrategyContext(num_clients, seed))


def client_hook(algorithm_cfg: Any) -> ClientHook:
    """The client half of the configured algorithm."""
    return get_algorithm(algorithm_cfg.name).client(algorithm_cfg)
