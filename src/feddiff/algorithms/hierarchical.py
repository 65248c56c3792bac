"""Hierarchical FL: clients -> edge servers -> a central server. HierFAVG here; FedPhD in ``fedphd.py``.

HierFAVG: Liu, Zhang, Song, Letaief, "Client-Edge-Cloud Hierarchical Federated Learning", ICC 2020
(https://arxiv.org/abs/1905.06641). FedPhD: Long et al. 2025 (https://arxiv.org/abs/2507.06449), as
read from the authors' code (shared/reference/papers.md 1.1-1.6, 1.10); its rules are pure functions in
``homogeneity.py``.

Every round each sampled client is attached to an edge (``selection``), trains from that edge's model
w_e and uploads its model on the ``client-edge`` link; each edge averages its clients (sample-weighted),
sets N_e to this round's samples, and folds each client's label distribution into its running q_e, n_e.
Every ``central_every`` rounds the edges send (w_e, N_e, q_e) to the central server on the
``edge-cloud`` link, which averages them with lambda_e = max(N_e + a HS(q_e) + b, 0) and sends the
result back; every edge then starts from it and (q_e, n_e) reset to (p*, 0). a = 0 is HierFAVG's
sample weighting. The global model (evaluated, exported) is the last central one.

Faithful options for the authors' artefacts: ``central_schedule = "code"`` aggregates centrally at
0-based rounds 0, 5, 10, ... as their ``round_idx % 5 == 0`` does (the first after a single round);
the default, ``"every"``, after rounds 5, 10, ... as the paper describes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import numpy as np
from pydantic import model_validator

from feddiff.algorithms.aggregate import weighted_mean
from feddiff.algorithms.base import Failure, Reply, Strategy, StrategyContext, Task, Transfer
from feddiff.algorithms.homogeneity import (
    central_weights, distribution, merge, selection_probabilities, uniform_target,
)
from feddiff.algorithms.registry import Algorithm, register
from feddiff.config import F, AlgorithmConfig
from feddiff.seeding import numpy_rng
from feddiff.types import StateDict, clone_state, under

EDGE_LINK = "client-edge"
CLOUD_LINK = "edge-cloud"
SELECTIONS = ("homogeneity", "random", "round-robin", "fixed")


class HierFAVGConfig(AlgorithmConfig):
    """HierFAVG (Liu et al. 2020): FedAvg at the edges every round, sample-weighted at the centre."""

    name: Literal["hierfavg"] = F("hierfavg", "algorithm: hierfavg")
    num_edges: int = F(2, "edge servers E", ge=1)
    central_every: int = F(5, "rounds between central aggregations", ge=1)
    central_schedule: Literal["every", "code"] = F(
        "every", "every = after rounds k*central_every (the paper); code = at 0-based rounds 0, k, 2k (the "
        "authors' code: the first central aggregation after a single round)"
    )
    selection: Literal["homogeneity", "random", "round-robin", "fixed"] = F(
        "random", "client -> edge each round: homogeneity (FedPhD), random, round-robin over the round's "
        "clients, or fixed (edge_of)"
    )
    edge_of: list[int] = F([], "selection = fixed: the edge of each client (a real deployment's map)")

    def global_fresh_after(self, rounds: int) -> str | None:
        every = self.central_every
        central = (rounds - 1) % every == 0 if self.central_schedule == "code" else rounds % every == 0
        if central:
            return None
        which = "rounds 1, 1 + k, 1 + 2k, ..." if self.central_schedule == "code" else "multiples of k"
        return (f"the global model of a hierarchy is the last central aggregate, which round {rounds} does not "
                f"update; prune after a central round ({which}, k = central_every = {every})")
    select_c: float = F(10000.0, "homogeneity selection: c in max(c*HS - n_e + b, 0) + eps", ge=0)
    select_b: float = F(0.0, "homogeneity selection: b")
    select_eps: float = F(1e-8, "homogeneity selection: eps (keeps every edge possible)", gt=0)
    central_a: float = F(0.0, "central weights max(N_e + a*HS(q_e) + b, 0): a (0 = sample-weighted HierFAVG)")
    central_b: float = F(0.0, "central weights: b")
    target: list[float] = F([], "p*, the target label distribution of HS; empty = uniform over classes")
    evaluate_edges: bool = F(False, "evaluate each edge's model too (the global model is the last central one)")

    @model_validator(mode="after")
    def _consistent(self) -> HierFAVGConfig:
        if self.selection == "fixed" and not self.edge_of:
            raise ValueError("selection = \"fixed\" needs edge_of, the edge of each client (e.g. [0, 0, 1, 1])")
        bad = [e for e in self.edge_of if not 0 <= e < self.num_edges]
        if bad:
            raise ValueError(f"edge_of names edges {bad}; edges are 0..{self.num_edges - 1} (num_edges)")
        if self.target and (min(self.target) < 0 or abs(sum(self.target) - 1) > 1e-6):
            raise ValueError(f"target must be a distribution (>= 0, summing to 1), got {self.target}")
        return self


class Hierarchical(Strategy):
    """Clients -> edges -> central server; the rules of selection and central weights come from the config."""

    client_link = EDGE_LINK

    def __init__(self, cfg: Any, context: StrategyContext):
        super().__init__(cfg, context)
        if cfg.selection == "fixed" and len(cfg.edge_of) != context.num_clients:
            raise ValueError(f"algorithm.edge_of has {len(cfg.edge_of)} entries for {context.num_clients} clients")
        self.num_edges = cfg.num_edges
        self.edges: list[StateDict] = []
        self.edge_samples = [1.0] * cfg.num_edges  # N_e: samples of the edge's last round (authors: initially 1)
        self.q: list[np.ndarray] = []  # q_e since the last central aggregation
        self.n = [0.0] * cfg.num_edges  # n_e since the last central aggregation
        self.pending: dict[int, int] = {}  # client -> edge of the round being run
        self.summary: dict[str, Any] = {}
        # label histograms are disclosed only when a rule uses them
        self.needs = ("label_histogram",) if (cfg.selection == "homogeneity" or cfg.central_a) else ()

    # -- set-up -------------------------------------------------------------------------------
    def initialize(self, initial: StateDict, spec=None) -> None:
        super().initialize(initial, spec)
        self.edges = [clone_state(initial) for _ in range(self.num_edges)]

    def target(self) -> np.ndarray:
        """p*: the configured target, else uniform over the classes of the disclosed histograms."""
        if self.cfg.target:
            return np.asarray(self.cfg.target, dtype=np.float64)
        hist = next(iter(self.client_info.values()), None)
        return uniform_target(len(hist["label_histogram"]) if hist is not None else 1)

    def _reset_stats(self) -> None:
        self.q = [self.target() for _ in range(self.num_edges)]
        self.n = [0.0] * self.num_edges

    def client_distribution(self, k: int) -> tuple[np.ndarray, float]:
        """p_k and n_k from client k's disclosed label histogram."""
        counts = self.client_info[k]["label_histogram"].double().numpy()
        return distribution(counts), float(counts.sum())

    # -- one round ------------------------------------------------------------------------------
    def assign(self, rnd: int, clients: list[int]) -> dict[int, int]:
        """The edge of each of the round's clients; every client chooses against the same snapshot."""
        sel = self.cfg.selection
        if sel == "fixed":
            return {k: int(self.cfg.edge_of[k]) for k in clients}
        if sel == "round-robin":
            return {k: i % self.num_edges for i, k in enumerate(clients)}
        rng = numpy_rng(self.seed, "edge-select", rnd)
        if sel == "random":
            return {k: int(rng.integers(self.num_edges)) for k in clients}
        if not self.q:
            self._reset_stats()
        out, self.summary["select_p"] = {}, {}
        for k in clients:
            p_k, n_k = self.client_distribution(k)
            probs = selection_probabilities(self.q, self.n, p_k, n_k, self.target(), self.cfg.select_c,
                                            self.cfg.select_b, self.cfg.select_eps)
            out[k] = int(rng.choice(self.num_edges, p=probs))
            self.summary["select_p"][str(k)] = [round(float(p), 6) for p in probs]
        return out

    def configure(self, rnd: int) -> list[Task]:
        self.summary = {}
        self.pending = self.assign(rnd, self.sample_clients(rnd))
        return [Task(k, self.edges[e], {"round": rnd, "upload": "all"}, link=EDGE_LINK)
                for k, e in sorted(self.pending.items())]

    def aggregation_group(self, task: Task) -> Any:
        """A client's replies are averaged with its edge's."""
        return self.pending[task.client]

    def is_central(self, rnd: int) -> bool:
        """Whether round ``rnd`` (0-based) ends with a central aggregation."""
        every = self.cfg.central_every
        return rnd % every == 0 if self.cfg.central_schedule == "code" else (rnd + 1) % every == 0

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        by_edge: dict[int, list[Reply]] = defaultdict(list)
        for r in replies:
            by_edge[self.pending[r.client]].append(r)
        if self.needs and not self.q:
            self._reset_stats()
        for e, rs in sorted(by_edge.items()):  # edges without replies keep w_e and N_e
            self.edges[e] = weighted_mean([r.tensors for r in rs], [r.num_samples for r in rs])
            self.edge_samples[e] = float(sum(r.num_samples for r in rs))
            if self.needs:
                for r in rs:  # the clients that arrived, in order (the authors fold them one by one)
                    p_k, n_k = self.client_distribution(r.client)
                    self.q[e], self.n[e] = merge(self.q[e], self.n[e], p_k, n_k)
        self.summary["edges"] = {f"edge{e}": sorted(r.client for r in by_edge.get(e, [])) for e in range(self.num_edges)}
        return {}

    def exchange(self, rnd: int, arrived: list[Transfer]) -> list[Transfer]:
        if not self.is_central(rnd):
            return []
        if not arrived:  # edges -> cloud: (w_e, N_e, q_e)
            q = self.q or [self.target()] * self.num_edges
            return [Transfer(f"edge{e}", "cloud", CLOUD_LINK, self.edges[e],
                             {"num_samples": self.edge_samples[e], "q": [float(x) for x in q[e]]}, "up")
                    for e in range(self.num_edges)]
        if arrived[0].dst == "cloud":  # the central aggregation, on what the cloud decoded
            lam = self.central_lambda(arrived)
            self.global_model = weighted_mean([t.tensors for t in arrived], lam.tolist())
            self.summary["central_weights"] = [round(float(x), 6) for x in lam]
            return [Transfer("cloud", f"edge{e}", CLOUD_LINK, self.global_model, {}, "down")
                    for e in range(self.num_edges)]
        for t in arrived:  # cloud -> edges: every edge starts from the global model
            self.edges[int(t.dst.removeprefix("edge"))] = t.tensors
        if self.needs:
            self._reset_stats()
        self.summary["central"] = True
        return []

    def central_lambda(self, arrived: list[Transfer]) -> np.ndarray:
        """lambda_e from what the edges sent up: max(N_e + a HS(q_e) + b, 0), normalised."""
        return central_weights([t.meta["num_samples"] for t in arrived], [np.asarray(t.meta["q"]) for t in arrived],
                               self.target(), self.cfg.central_a, self.cfg.central_b)

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        return dict(self.summary)

    def side_models(self) -> dict[str, StateDict]:
        return {f"edge{e}": w for e, w in enumerate(self.edges)} if self.cfg.evaluate_edges else {}

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        tensors, meta = super().state_dict()
        for e, w in enumerate(self.edges):
            tensors.update({f"edge{e}/{k}": v for k, v in w.items()})
        meta = {**meta, "edge_samples": self.edge_samples, "q": [q.tolist() for q in self.q], "n": self.n}
        return tensors, meta

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.edges = [under(tensors, f"edge{e}/") for e in range(self.num_edges)]
        self.edge_samples = [float(x) for x in meta["edge_samples"]]
        self.q = [np.asarray(q, dtype=np.float64) for q in meta["q"]]
        self.n = [float(x) for x in meta["n"]]


register(Algorithm("hierfavg", HierFAVGConfig, Hierarchical))

__all__ = ["CLOUD_LINK", "EDGE_LINK", "HierFAVGConfig", "Hierarchical", "SELECTIONS"]
