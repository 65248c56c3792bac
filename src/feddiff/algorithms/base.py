"""The strategy interface: the server half and the client half of every algorithm.

The engines own the round loop (written once, in ``engines/loop.py``); a strategy only says what to
send to whom (:meth:`Strategy.configure`), how to combine what came back (:meth:`Strategy.aggregate`)
and, for hierarchies, what passes between server tiers (:meth:`Strategy.exchange`). Its client half, a
:class:`ClientHook`, says what the algorithm adds to local training and what extra it sends back.
Strategies never serialize, count bytes or train: the links do the former, the client runtime
(``client/runtime.py``) the latter.

A message has two sections: ``tensors``, what the client loads as (part of) its model, and ``extras``,
named algorithm tensors that are not model weights (SCAFFOLD's control variates, say). An algorithm is
registered once (``algorithms/registry.py``): its config section, its strategy and its client hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from feddiff.model.parts import select
from feddiff.model.spec import ModelSpec
from feddiff.seeding import numpy_rng
from feddiff.types import StateDict, clone_state, under

if TYPE_CHECKING:  # the client half's types, for annotations only
    from feddiff.client.runtime import ClientState
    from feddiff.client.train import LocalTerm, LocalTrainResult


@dataclass
class Task:
    """Server -> client: the model section, algorithm extras, and JSON-able instructions.

    Keys of ``config`` every client understands: ``round`` (int), ``upload`` ("all" or a list of
    parameter-group names), ``personal`` (keep a persistent local model and load the received
    tensors over it). An algorithm's client hook declares the keys it reads (``config_keys``);
    any other key is an error on the client.
    """

    client: int
    tensors: StateDict
    config: dict[str, Any] = field(default_factory=dict)
    link: str = "client-server"
    extras: StateDict = field(default_factory=dict)


@dataclass
class Reply:
    """Client -> server: the uploaded model tensors, the client's sample count, metrics and extras.

    ``num_samples`` is the aggregation weight. The engine sets it from what it knows of the client
    (the partition, in the simulator) and keeps a client's own claim in ``claimed_samples``.
    """

    client: int
    tensors: StateDict
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: StateDict = field(default_factory=dict)
    claimed_samples: int | None = None


@dataclass(frozen=True)
class Failure:
    """A task that produced no usable reply: the client and why (raised, rejected, timed out)."""

    client: int
    reason: str


@dataclass
class Transfer:
    """Tensors passing between server tiers (edge -> cloud, cloud -> edge), carried through the links.

    ``direction`` is "up" toward the central server, "down" away from it; the link's codec of that
    direction encodes the tensors (as weights) and ``meta`` travels in the message header (JSON, exact);
    the ledger counts the bytes on ``link`` at ``src`` (up) or ``dst`` (down).
    """

    src: str
    dst: str
    link: str
    tensors: StateDict
    meta: dict[str, Any] = field(default_factory=dict)
    direction: str = "up"


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may know of the federation when it is built.

    Parameters
    ----------
    num_clients
        Number of clients K.
    seed
        Root seed; every draw of the strategy is a function of (seed, round, ...).
    spec
        The initial model spec.
    num_samples
        Each client's train-set size, when the engine knows it (the simulator's partition); None otherwise.
    """

    num_clients: int
    seed: int
    spec: ModelSpec | None = None
    num_samples: tuple[int, ...] | None = None


class Strategy:
    """Base class: the global model, its spec, and seeded client sampling.

    Parameters
    ----------
    cfg
        The algorithm section of the config (``fraction``, ``min_clients`` and the algorithm's own fields).
    context
        The federation: number of clients, seed, model spec.
    """

    personalized: ClassVar[bool] = False  # clients keep personal models that are evaluated one by one
    shared: ClassVar[tuple[str, ...] | None] = None  # personal-model algorithms: the groups that are shared
    # client facts the strategy asks for before round 1 (disclosed by each client, counted in the ledger)
    needs: ClassVar[tuple[str, ...]] = ()
    client_link: ClassVar[str] = "client-server"  # the link clients talk to the server on (setup queries too)

    def __init__(self, cfg: Any, context: StrategyContext):
        self.cfg = cfg
        self.context = context
        self.num_clients = context.num_clients
        self.seed = context.seed
        self.spec: ModelSpec | None = context.spec
        self.global_model: StateDict = {}
        self.client_info: dict[int, dict[str, torch.Tensor]] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self, initial: StateDict, spec: ModelSpec | None = None) -> None:
        """Take the initial global model (the server owns its copy) and its spec."""
        self.global_model = clone_state(initial)
        if spec is not None:
            self.spec = spec

    def receive_info(self, client: int, info: dict[str, torch.Tensor]) -> None:
        """A client's answer to :attr:`needs` (e.g. ``{"label_histogram": counts}``), before round 1."""
        self.client_info[client] = info

    def sample_clients(self, rnd: int) -> list[int]:
        """floor(fraction * K) clients (at least min_clients), uniformly without replacement."""
        k = self.num_clients
        m = min(k, max(self.cfg.min_clients, int(self.cfg.fraction * k + 1e-9)))
        if m == k:
            return list(range(k))
        return sorted(int(c) for c in numpy_rng(self.seed, "sample", rnd).choice(k, m, replace=False))

    def configure(self, rnd: int) -> list[Task]:
        """The tasks of round ``rnd`` (0-based): one per client that takes part.

        Parameters
        ----------
        rnd
            The round, counted from 0.

        Returns
        -------
        list[Task]
            What each selected client receives. Must not commit per-client state: a task may fail.
        """
        raise NotImplementedError

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        """Combine the replies that arrived (validated, at least one) into the new global state.

        Parameters
        ----------
        rnd
            The round, counted from 0.
        replies
            The validated replies, in task order.
        failures
            The tasks that gave no usable reply (raised, rejected); their clients' state stays as it was.

        Returns
        -------
        dict[str, float]
            Metrics of the aggregation, recorded in the round's line of ``metrics.jsonl``.
        """
        raise NotImplementedError

    def exchange(self, rnd: int, arrived: list[Transfer]) -> list[Transfer]:
        """Transfers between server tiers after :meth:`aggregate`; called until it returns none.

        Parameters
        ----------
        rnd
            The round, counted from 0.
        arrived
            The previous call's transfers as the receiving tier decoded them ([] on the first call).

        Returns
        -------
        list[Transfer]
            The next transfers to carry (through the codecs and the ledger), or [] when the round is done.
        """
        return []

    def screen(self, rnd: int, replies: list[Reply]) -> tuple[list[Reply], list[Failure]]:
        """Replies to aggregate and those refused before aggregation (robust wrappers); all kept by default."""
        return replies, []

    def idle_metrics(self, rnd: int) -> dict[str, Any]:
        """What a round that aggregated nothing records (a privacy budget); nothing by default."""
        return {}

    def aggregation_group(self, task: Task) -> Any:
        """Replies of one group are averaged together (a hierarchy: the client's edge); one group by default."""
        return 0

    def expected_extras(self, task: Task) -> StateDict | None:
        """The extras a valid reply carries, with their shapes and dtypes; None: not checked (the default)."""
        return None

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        """What the strategy records about round ``rnd`` after its exchanges (edge choices, central weights)."""
        return {}

    def expected_upload(self, task: Task) -> set[str]:
        """The model tensor names a valid reply to ``task`` carries (the validator checks them)."""
        upload = task.config.get("upload", "all")
        return set(self.global_model) if upload == "all" else set(select(self.global_model, upload))

    # -- what evaluation and export see ----------------------------------------------------
    def global_state(self) -> StateDict:
        """The model to evaluate and export."""
        return self.global_model

    def personal_model(self, personal: StateDict) -> StateDict:
        """For personalized strategies: the model a client holding ``personal`` would evaluate."""
        raise NotImplementedError(f"{type(self).__name__} has no personal models")

    def side_models(self) -> dict[str, StateDict]:
        """Models evaluated beside the global one (a hierarchy's edge models, when asked); never exported."""
        return {}

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        """Tensors and JSON-able state needed to resume exactly."""
        meta = {"spec": self.spec.to_json()} if self.spec is not None else {}
        tensors = {f"global/{k}": v for k, v in self.global_model.items()}
        for c, info in sorted(self.client_info.items()):  # what clients disclosed is not asked again
            tensors.update({f"info/{c}/{name}": v for name, v in info.items()})
        return tensors, meta

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.global_model = under(tensors, "global/")
        self.client_info = {}
        for key, v in tensors.items():
            if key.startswith("info/"):
                c, name = key.removeprefix("info/").split("/", 1)
                self.client_info.setdefault(int(c), {})[name] = v
        if "spec" in meta:
            self.spec = ModelSpec.from_json(meta["spec"])


class StrategyWrapper(Strategy):
    """A strategy around another (DP, EMA, robust aggregation): every call delegates to ``inner``.

    A wrapper overrides what it changes and calls ``self.inner`` for the rest; attributes it does not
    define are read from the inner strategy, so code that holds the wrapper sees one strategy.
    """

    def __init__(self, inner: Strategy):  # noqa: D107 - no Strategy.__init__: the state is the inner one's
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (unpickling, copy): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # state the inner strategy owns (global_model, spec, initialized, ...) is written there, so a wrapper
        # method that assigns self.global_model changes the model that is checkpointed and exported
        if name != "inner" and name not in type(self).__dict__ and "inner" in self.__dict__ and hasattr(
                self.inner, name):
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)

    personalized = property(lambda self: self.inner.personalized)  # type: ignore[assignment]
    shared = property(lambda self: self.inner.shared)  # type: ignore[assignment]
    needs = property(lambda self: self.inner.needs)  # type: ignore[assignment]
    client_link = property(lambda self: self.inner.client_link)  # type: ignore[assignment]

    def initialize(self, initial: StateDict, spec: ModelSpec | None = None) -> None:
        self.inner.initialize(initial, spec)

    def receive_info(self, client: int, info: dict[str, torch.Tensor]) -> None:
        self.inner.receive_info(client, info)

    def sample_clients(self, rnd: int) -> list[int]:
        return self.inner.sample_clients(rnd)

    def configure(self, rnd: int) -> list[Task]:
        return self.inner.configure(rnd)

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        return self.inner.aggregate(rnd, replies, failures)

    def exchange(self, rnd: int, arrived: list[Transfer]) -> list[Transfer]:
        return self.inner.exchange(rnd, arrived)

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        return self.inner.round_metrics(rnd)

    def screen(self, rnd: int, replies: list[Reply]) -> tuple[list[Reply], list[Failure]]:
        return self.inner.screen(rnd, replies)

    def idle_metrics(self, rnd: int) -> dict[str, Any]:
        return self.inner.idle_metrics(rnd)

    def aggregation_group(self, task: Task) -> Any:
        return self.inner.aggregation_group(task)

    def expected_extras(self, task: Task) -> StateDict | None:
        return self.inner.expected_extras(task)

    def expected_upload(self, task: Task) -> set[str]:
        return self.inner.expected_upload(task)

    def global_state(self) -> StateDict:
        return self.inner.global_state()

    def personal_model(self, personal: StateDict) -> StateDict:
        return self.inner.personal_model(personal)

    def side_models(self) -> dict[str, StateDict]:
        return self.inner.side_models()

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        return self.inner.state_dict()

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        self.inner.load_state_dict(tensors, meta)


class ClientHook:
    """The client half of an algorithm: what it adds to local training, what extra it sends back.

    One instance serves every client of a process; what a client must keep between rounds goes into
    its :class:`~feddiff.client.runtime.ClientState` (``state.tensors`` under the hook's own prefix),
    which the engine checkpoints (simulator) or keeps in the node's context (Flower).
    """

    config_keys: ClassVar[frozenset[str]] = frozenset()  # task config keys this hook reads

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def terms(self, task: Task, state: ClientState) -> list[LocalTerm]:
        """Terms added to local training this round (a proximal pull, a gradient correction, ...)."""
        return []

    def reply_extras(self, task: Task, state: ClientState, trained: StateDict, result: LocalTrainResult) -> StateDict:
        """Extra tensors sent back with the model section (e.g. SCAFFOLD's change of control variate)."""
        return {}


class CompositeHook(ClientHook):
    """Several client halves as one (an algorithm's and its wrappers'): terms and extras of each, in order."""

    def __init__(self, hooks: list[ClientHook]):
        super().__init__(None)
        self.hooks = hooks
        self.config_keys = frozenset().union(*(h.config_keys for h in hooks))  # type: ignore[misc]

    def terms(self, task: Task, state: ClientState) -> list[LocalTerm]:
        return [t for h in self.hooks for t in h.terms(task, state)]

    def reply_extras(self, task: Task, state: ClientState, trained: StateDict, result: LocalTrainResult) -> StateDict:
        out: StateDict = {}
        for h in self.hooks:
            extras = h.reply_extras(task, state, trained, result)
            clash = sorted(set(out) & set(extras))
            if clash:
                raise ValueError(f"two client hooks send the extra(s) {clash}")
            out.update(extras)
        return out
