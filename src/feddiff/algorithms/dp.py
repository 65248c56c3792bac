"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018, https://arxiv.org/abs/1710.06963).

``[dp]`` wraps FedAvg or FedProx (an allow-list: algorithms whose messages carry only the model, with
nothing kept on clients that is evaluated or released). Every round, on the server, before anything
is aggregated:

1. each client's update ``Delta_k = reply_k - w`` (``w``: what it was sent) is clipped to L2 norm
   ``clip_norm`` C over every floating tensor it uploads;
2. the new model is ``w + (sum_k Delta_k) / M + N(0, (2 sigma C / M)^2)``: ``M`` is the number of
   clients selected for the round (fixed before any client trains; one that fails adds a zero
   update), so one client replaced by another (or by one that fails) moves the mean by at most
   ``2C / M``, and the noise is ``sigma`` times that sensitivity (``sigma`` = ``noise_multiplier``).

Accounting: each round is a Gaussian mechanism with noise multiplier ``sigma`` on its sensitivity;
the rounds compose, and Opacus' RDP accountant reports ``epsilon`` at ``delta`` with sampling rate 1
(no amplification by client sampling is claimed: the sampling is a fixed-size draw, not the Poisson
sampling the amplification theorem assumes). The guarantee is for replacing one client's data.

The noise is drawn from the operating system's entropy, never stored: a released model cannot be
de-noised from its run folder, and a redone round (resume after a crash) draws new noise.
``dp.reproducible_noise = true`` draws it from the run's seed instead (for tests and exact resumes);
such a run is marked ``"noise": "seeded (not private)"`` in every metrics line.

It fails closed, before any training: DP on without ``clip_norm``, a ``[dp]`` setting while DP is off,
an algorithm outside the allow-list, ``[robust]`` aggregation or screening (a median's sensitivity is
not a mean's, and screening depends on every client's data), federated reference statistics, or a run
whose planned rounds would spend more than ``max_epsilon``; and during a round, a reply holding a
tensor the server did not send (a reply with extras is refused by validation: nothing unclipped is
aggregated). Not protected, and said so in docs/privacy.md: each client's training loss in
``metrics.jsonl``.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

import torch

from feddiff.algorithms.aggregate import clip_update
from feddiff.algorithms.base import Failure, Reply, Strategy, StrategyWrapper, Task
from feddiff.algorithms.registry import Wrapper, register_wrapper
from feddiff.seeding import torch_generator
from feddiff.types import StateDict

SUPPORTED = ("fedavg", "fedprox")


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


def check(cfg: Any) -> None:
    """The checks made before training (config validation calls it): raises ValueError naming the setting."""
    d = cfg.dp
    if not d.noise_multiplier:
        stray = [k for k in ("clip_norm", "max_epsilon") if getattr(d, k)] + (["reproducible_noise"]
                                                                              if d.reproducible_noise else [])
        if stray:
            raise ValueError(f"dp.{stray[0]} is set but dp.noise_multiplier = 0, which turns DP off: set "
                             "noise_multiplier > 0 (for clipping alone, use robust.clip_norm)")
        return
    if not d.clip_norm:
        raise ValueError("dp.noise_multiplier > 0 needs dp.clip_norm > 0: noise is calibrated to the clipping "
                         "bound, and without one no update is bounded")
    if cfg.algorithm.name not in SUPPORTED:
        raise ValueError(f"dp is available with {list(SUPPORTED)}, not {cfg.algorithm.name!r}: its messages or its "
                         "clients' kept models (personal parts, control variates, an edge tier, parts averaged over "
                         "subsets) would leave what the guarantee covers")
    r = cfg.robust
    if r.aggregation != "mean" or r.outlier_factor:
        raise ValueError("dp with robust.aggregation = median/trimmed_mean or robust.outlier_factor: the noise is "
                         "calibrated to a mean of clipped updates, and screening depends on every client's data; "
                         "use robust.clip_norm alone, or no [robust]")
    if cfg.eval.federated_reference:
        raise ValueError("dp with eval.federated_reference: the clients' feature sums would leave them unprotected")
    if d.max_epsilon:
        planned = epsilon(d.noise_multiplier, 1.0, cfg.run.num_rounds, d.delta)
        if planned > d.max_epsilon:
            raise ValueError(f"the planned {cfg.run.num_rounds} rounds would spend epsilon = {planned:.3f} at delta = "
                             f"{d.delta:g}, over dp.max_epsilon = {d.max_epsilon:g}; raise dp.noise_multiplier, "
                             "lower run.num_rounds, or raise the budget")


class DPStrategy(StrategyWrapper):
    """``[dp]`` around ``inner``: clipped updates, a fixed denominator, noise calibrated to ``2C / M``."""

    def __init__(self, inner: Strategy, cfg: Any, seed: int):
        super().__init__(inner)
        self.dp_cfg, self.dp_seed = cfg, seed
        self.dp_tasks: dict[int, Task] = {}
        self.dp_rounds = 0  # aggregated rounds: the accountant's steps
        self.dp_summary: dict[str, Any] = {}

    def configure(self, rnd: int) -> list[Task]:
        tasks = self.inner.configure(rnd)
        self.dp_tasks = {t.client: t for t in tasks}
        self.dp_summary = {}
        return tasks

    def expected_extras(self, task: Task) -> StateDict | None:
        return {}  # a reply with extras is refused by validation: they could not be clipped

    def _noise(self, rnd: int) -> torch.Generator:
        if self.dp_cfg.reproducible_noise:
            return torch_generator("cpu", self.dp_seed, "dp-noise", rnd)
        return torch.Generator().manual_seed(secrets.randbits(63))  # never stored

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        c, big_m = self.dp_cfg.clip_norm, len(self.dp_tasks)
        scaled = []
        for r in replies:
            sent = self.dp_tasks[r.client].tensors
            unknown = [k for k, v in r.tensors.items() if k not in sent or sent[k].shape != v.shape
                       or (not v.is_floating_point() and not torch.equal(v, sent[k]))]
            if unknown or r.extras:
                raise DPError(f"round {rnd + 1}: client {r.client}'s reply holds {unknown[:3] or sorted(r.extras)[:3]}, "
                              "which the server cannot clip: nothing of it is aggregated, and the run stops")
            tensors, _ = clip_update(r.tensors, sent, c)
            # the wrapped algorithm takes an equally weighted mean over the m replies: scaling each update by
            # m / M makes it sum_k Delta_k / M, the fixed denominator (a failed client adds nothing)
            f = len(replies) / big_m
            tensors = {k: (sent[k].double() + (v.double() - sent[k].double()) * f).to(v.dtype) if v.is_floating_point()
                       else v for k, v in tensors.items()}
            scaled.append(replace(r, tensors=tensors, num_samples=1))
        metrics = self.inner.aggregate(rnd, scaled, failures)
        std = 2 * self.dp_cfg.noise_multiplier * c / big_m
        g = self._noise(rnd)
        model = dict(self.inner.global_model)
        for k in sorted({k for r in scaled for k in r.tensors}):
            v = model[k]
            if v.is_floating_point():
                model[k] = (v.double() + torch.randn(v.shape, generator=g, dtype=torch.float64) * std).to(v.dtype)
        self.inner.global_model = model
        self.dp_rounds += 1
        self.dp_summary = {**self._spent(), "noise_std": std, "selected": big_m}
        return metrics

    def _spent(self) -> dict[str, Any]:
        d = self.dp_cfg
        return {"epsilon": round(epsilon(d.noise_multiplier, 1.0, self.dp_rounds, d.delta), 6), "delta": d.delta,
                "noise_multiplier": d.noise_multiplier, "clip_norm": d.clip_norm, "rounds": self.dp_rounds,
                "noise": "seeded (not private)" if d.reproducible_noise else "os entropy"}

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        return {**self.inner.round_metrics(rnd), "dp": self.dp_summary or self._spent()}

    def idle_metrics(self, rnd: int) -> dict[str, Any]:
        """A round that aggregated nothing spent nothing: the budget so far, in its metrics line too."""
        return {**self.inner.idle_metrics(rnd), "dp": self._spent()}

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        tensors, meta = self.inner.state_dict()
        return tensors, {**meta, "dp_rounds": self.dp_rounds}

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        meta = dict(meta)
        if "dp_rounds" not in meta:
            raise DPError("this checkpoint does not record the DP rounds spent: the budget cannot be continued")
        self.dp_rounds = int(meta.pop("dp_rounds"))
        self.inner.load_state_dict(tensors, meta)


def wrap(strategy: Strategy, cfg: Any) -> Strategy:
    if not cfg.dp.noise_multiplier:
        return strategy
    check(cfg)
    return DPStrategy(strategy, cfg.dp, cfg.run.seed)


register_wrapper(Wrapper("dp", wrap, order=20))
