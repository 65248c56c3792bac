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

from feddiff.algorithms.base import ClientHook, CompositeHook, Strategy, StrategyContext


@dataclass(frozen=True)
class Algorithm:
    """An algorithm as the rest of feddiff sees it."""

    name: str
    config: type  # a subclass of feddiff.config.AlgorithmConfig with ``name: Literal[<name>]``
    strategy: type[Strategy]
    client: type[ClientHook] = ClientHook


ALGORITHMS: dict[str, Algorithm] = {}



@dataclass(frozen=True)
class Wrapper:
    """A feature composed around any algorithm (pruning, DP, EMA, robust aggregation).

    ``wrap(strategy, cfg)`` returns the strategy wrapped, or unchanged when the wrapper's config section is
    off; ``client(cfg)`` its client half (a :class:`ClientHook` added to the algorithm's), or None.
    Wrappers are applied in ``order``, lowest innermost: one that restructures every tensor of the
    strategy it wraps (pruning) goes outermost, so it sees the state of the wrappers inside it.
    """

    name: str
    wrap: Callable[[Strategy, Any], Strategy]
    client: Callable[[Any], ClientHook | None] | None = None
    order: int = 0


WRAPPERS: list[Wrapper] = []


def register_wrapper(entry: Wrapper) -> Wrapper:
    """Add a wrapper (once per name)."""
    if any(w.name == entry.name and w != entry for w in WRAPPERS):
        raise ValueError(f"wrapper {entry.name!r} is registered twice")
    if entry not in WRAPPERS:
        WRAPPERS.append(entry)
        WRAPPERS.sort(key=lambda w: w.order)
    return entry


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
    for wrapper in WRAPPERS:
        strategy = wrapper.wrap(strategy, cfg)
    return strategy


def strategy_from(algorithm_cfg: Any, num_clients: int, seed: int) -> Strategy:
    """A bare strategy from an algorithm section alone (tests, notebooks): no wrappers, no spec."""
    return get_algorithm(algorithm_cfg.name).strategy(algorithm_cfg, StrategyContext(num_clients, seed))


def client_hook(cfg: Any) -> ClientHook:
    """The client half of a run: the algorithm's hook, with the client halves of its wrappers.

    Parameters
    ----------
    cfg
        The whole run config, or an algorithm section alone (then: the algorithm's hook only).
    """
    algorithm_cfg = getattr(cfg, "algorithm", cfg)
    hooks = [get_algorithm(algorithm_cfg.name).client(algorithm_cfg)]
    if algorithm_cfg is not cfg:
        hooks += [h for w in WRAPPERS if w.client is not None and (h := w.client(cfg)) is not None]
    return hooks[0] if len(hooks) == 1 else CompositeHook(hooks)
