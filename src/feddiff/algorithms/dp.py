"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018, https://arxiv.org/abs/1710.06963).

``[dp]`` wraps an algorithm whose server state is one global model (FedAvg, FedProx, USPLIT, UDEC,
ULATDEC). Every round, on the server, before anything is aggregated:

1. each client's update ``Delta_k = reply_k - w`` (``w``: what it was sent) is clipped to L2 norm
   ``clip_norm`` C, over every floating tensor it uploads;
2. the clipped updates are averaged with equal weights (the sample counts would change the
   sensitivity), by the wrapped algorithm's own aggregation;
3. Gaussian noise N(0, (sigma C / m)^2) is added to every aggregated coordinate (``m``: the replies
   aggregated; as Flower's server-side fixed clipping does), sigma = ``noise_multiplier``.

The privacy loss of the run is tracked with Opacus' RDP accountant (one step per aggregated round,
sampling rate q = clients selected per round / clients): ``epsilon`` at ``delta`` goes into every
metrics line (``dp``) and the report. The guarantee is at the level of a whole client's data, for a
server that is trusted to add the noise (central DP); the noise is drawn from a seeded stream, so a
run can be reproduced, which also means anyone with the seed could remove it: use a secret seed
(``run.seed``) for a release.

It fails closed, before any training: DP on without ``clip_norm``, an algorithm whose messages carry
more than the clipped model (SCAFFOLD's control variates, a hierarchy's edge tier), or a run whose
planned rounds would spend more than ``max_epsilon``; and during a round, a reply holding a tensor the
server did not send (nothing unclipped is ever aggregated).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from feddiff.algorithms.aggregate import clip_update
from feddiff.algorithms.base import Failure, Reply, Strategy, StrategyWrapper, Task
from feddiff.algorithms.registry import Wrapper, register_wrapper
from feddiff.seeding import torch_generator
from feddiff.types import StateDict

UNSUPPORTED = {
    "scaffold": "its control-variate deltas travel beside the model and would leave the clients unclipped",
    "hierfavg": "its edge tier aggregates before the server could clip and noise client updates",
    "fedphd": "its edge tier aggregates before the server could clip and noise client updates",
}


class DPError(RuntimeError):
    """A privacy guarantee would not hold: the run stops rather than go on without it."""


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` rounds, from Opacus' RDP accountant (0 steps: 0)."""
    if steps == 0:
        return 0.0
    import warnings

    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only loose
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def sample_rate(cfg: Any) -> float:
    """Clients selected per round / clients (the algorithm's sampling, as ``Strategy.sample_clients``)."""
    k = cfg.partition.num_clients
    a = cfg.algorithm
    m = min(k, max(getattr(a, "min_clients", 1), int(getattr(a, "fraction", 1.0) * k + 1e-9)))
    return m / k


def check(cfg: Any) -> None:
    """The checks made before training (config validation calls it): raises ValueError naming the setting."""
    d = cfg.dp
    if not d.noise_multiplier:
        return
    if not d.clip_norm:
        raise ValueError("dp.noise_multiplier > 0 needs dp.clip_norm > 0: noise is calibrated to the clipping "
                         "bound, and without one no update is bounded")
    why = UNSUPPORTED.get(cfg.algorithm.name)
    if why:
        raise ValueError(f"dp is not available with algorithm {cfg.algorithm.name!r}: {why}; "
                         f"choose one of fedavg, fedprox, usplit, udec, ulatdec")
    if d.max_epsilon:
        planned = epsilon(d.noise_multiplier, sample_rate(cfg), cfg.run.num_rounds, d.delta)
        if planned > d.max_epsilon:
            raise ValueError(f"the planned {cfg.run.num_rounds} rounds would spend epsilon = {planned:.3f} at delta = "
                             f"{d.delta:g}, over dp.max_epsilon = {d.max_epsilon:g}; raise dp.noise_multiplier, "
                             "lower run.num_rounds or algorithm.fraction, or raise the budget")


class DPStrategy(StrategyWrapper):
    """``[dp]`` around ``inner``: clipped, equally weighted updates plus calibrated Gaussian noise."""

    def __init__(self, inner: Strategy, cfg: Any, seed: int, rate: float):
        super().__init__(inner)
        self.dp_cfg, self.dp_seed, self.rate = cfg, seed, rate
        self.tasks: dict[int, Task] = {}
        self.dp_rounds = 0  # aggregated rounds: the accountant's steps
        self.dp_summary: dict[str, Any] = {}

    def configure(self, rnd: int) -> list[Task]:
        tasks = self.inner.configure(rnd)
        self.tasks = {t.client: t for t in tasks}
        self.dp_summary = {}
        return tasks

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        c = self.dp_cfg.clip_norm
        clipped, norms = [], []
        for r in replies:
            sent = self.tasks[r.client].tensors
            unknown = [k for k, v in r.tensors.items() if k not in sent or sent[k].shape != v.shape]
            if unknown or r.extras:
                raise DPError(f"round {rnd + 1}: client {r.client}'s reply holds {unknown[:3] or sorted(r.extras)[:3]}, "
                              "which the server did not send: it cannot be clipped, so nothing of it is aggregated")
            tensors, norm = clip_update(r.tensors, sent, c)
            norms.append(norm)
            clipped.append(replace(r, tensors=tensors, num_samples=1))  # equal weights: a bounded sensitivity
        metrics = self.inner.aggregate(rnd, clipped, failures)
        m = len(clipped)
        std = self.dp_cfg.noise_multiplier * c / m
        g = torch_generator("cpu", self.dp_seed, "dp-noise", rnd)
        uploaded = sorted({k for r in clipped for k in r.tensors})
        model = dict(self.inner.global_model)
        for k in uploaded:
            v = model[k]
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=g, dtype=torch.float64) * std
                model[k] = (v.double() + noise).to(v.dtype)
        self.inner.global_model = model
        self.dp_rounds += 1
        d = self.dp_cfg
        self.dp_summary = {
            "epsilon": round(epsilon(d.noise_multiplier, self.rate, self.dp_rounds, d.delta), 6), "delta": d.delta,
            "noise_multiplier": d.noise_multiplier, "clip_norm": c, "sample_rate": self.rate,
            "rounds": self.dp_rounds, "noise_std": std, "clipped": sum(n > c for n in norms),
        }
        return metrics

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        d = self.dp_cfg
        summary = self.dp_summary or {  # a round without aggregation spends nothing
            "epsilon": round(epsilon(d.noise_multiplier, self.rate, self.dp_rounds, d.delta), 6), "delta": d.delta,
            "rounds": self.dp_rounds}
        return {**self.inner.round_metrics(rnd), "dp": summary}

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        tensors, meta = self.inner.state_dict()
        return tensors, {**meta, "dp_rounds": self.dp_rounds}

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        meta = dict(meta)
        self.dp_rounds = int(meta.pop("dp_rounds", 0))
        self.inner.load_state_dict(tensors, meta)


def wrap(strategy: Strategy, cfg: Any) -> Strategy:
    if not cfg.dp.noise_multiplier:
        return strategy
    check(cfg)
    if not hasattr(strategy, "global_model"):
        raise DPError(f"dp needs an algorithm whose server holds one global model; {cfg.algorithm.name} does not")
    return DPStrategy(strategy, cfg.dp, cfg.run.seed, sample_rate(cfg))


register_wrapper(Wrapper("dp", wrap, order=20))
