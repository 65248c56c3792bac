"""Federated EMA: who keeps the exponential moving average of a federated diffusion model's weights.

Diffusion models are sampled from an EMA of their weights (Ho et al. 2020 keep one with decay 0.9999 per
step); in a federation it is not obvious who owns it, and FedPhD (Long et al. 2025) leaves "synchronizing
EMA updates in hierarchical FL" as future work. ``[ema]`` wraps any strategy with one of three rules, all
with the decay ``d`` expressed **per optimizer step**, so a round of ``S`` local steps decays the old
average by ``d^S`` (with ``warmup``: by ``prod_t min(d, (1 + t) / (10 + t))`` over the steps' global
indices ``t``, diffusers' EMA warm-up), whatever the local work:

- ``server``: the server keeps ``ema <- D ema + (1 - D) w`` of the global model ``w`` after every
  aggregated round, ``D = d^S`` with ``S`` the replies' sample-weighted mean of local steps. Costs
  nothing on the wire; works around every algorithm (personal-model schemes: the EMA of the shared parts,
  with each client's own private parts).
- ``client``: each round the server sends its EMA with the model (an extra, counted by the ledger); each
  client carries it through its local steps (``ema <- d ema + (1 - d) theta`` after every optimizer step)
  and sends it back; the server averages the clients' EMAs with the sample weights FedAvg uses. The
  average covers the local iterates, not only the round's end points. Doubles every message; for
  algorithms whose clients train the whole shared model (not personal-model schemes, not hierarchies).
- ``edge`` (hierarchies: HierFAVG, FedPhD): each edge keeps the EMA of its model, updated after each
  edge aggregation with its clients' steps; at every central aggregation the edges send their EMAs to
  the cloud with their models (``edge-cloud`` link, counted), the cloud averages them with the central
  weights ``lambda_e`` the models get, and sends the average back, which every edge continues from. The
  global EMA (evaluated, exported) is the last synchronized one.

The EMA is what is evaluated and exported (the exported pipeline samples from it); the raw global model
stays what clients train from, and ``ema.evaluate_raw`` evaluates it beside the EMA as the side model
``raw``. The EMA is checkpointed, restructured by pruning like every other state, and restored exactly
on resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from feddiff.algorithms.aggregate import weighted_mean
from feddiff.algorithms.base import ClientHook, Failure, Reply, Strategy, StrategyWrapper, Task, Transfer
from feddiff.algorithms.registry import Wrapper, get_algorithm, register_wrapper
from feddiff.client.train import LocalTerm, LocalTrainSpec, train_spec
from feddiff.model.parts import select
from feddiff.types import StateDict, clone_state, under

RULES = ("off", "server", "client", "edge")
PREFIX = "ema/"  # task and reply extras (client rule); checkpoint tensors of the global EMA
EDGE_PREFIX = "ema-edge/"  # checkpoint tensors of the edge EMAs
PENDING = "ema-run/"  # a client's EMA during its round (in its record only until the reply is built)
MAX_STEPS_PER_ROUND = 10_000_000  # a claimed step count beyond this is a bug or a lie: clamped


# -- the math (pure) ------------------------------------------------------------------------------
def decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay of global optimizer step ``step`` (0-based): ``decay``, or ``min(decay, (1+t)/(10+t))``."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def combined_decay(start: int, num_steps: float, decay: float, warmup: bool) -> float:
    """What ``num_steps`` steps from global step ``start`` leave of the old average: the product of their decays.

    Without warm-up this is ``decay ** num_steps`` (``num_steps`` may be fractional: a mean over clients).
    """
    if num_steps <= 0:
        return 1.0
    if not warmup:
        return decay ** num_steps
    # (1 + t) / (10 + t) >= decay from step t* on: the steps after it decay by ``decay`` each
    t_star = max(0, math.ceil((10 * decay - 1) / (1 - decay)))
    whole = int(num_steps)
    warm = max(0, min(whole, t_star - start))
    log = sum(math.log(decay_at(start + i, decay, True)) for i in range(warm))
    log += (whole - warm) * math.log(decay)
    log += (num_steps - whole) * math.log(decay_at(start + whole, decay, True))
    return math.exp(log)


def ema_update(ema: StateDict, model: StateDict, keep: float) -> StateDict:
    """``keep * ema + (1 - keep) * model`` per floating tensor (new tensors); other tensors are the model's."""
    return {k: torch.lerp(ema[k], v.to(ema[k].dtype), 1.0 - keep) if v.is_floating_point() and k in ema else v.clone()
            for k, v in model.items()}


def mean_steps(replies: list[Reply], steps: Callable[[Reply], int]) -> float:
    """The plain mean over the replies of their local steps (a mean that does not weigh data sizes)."""
    return sum(steps(r) for r in replies) / len(replies) if replies else 0.0


def check(cfg: Any, advise: bool = False) -> None:
    """The checks made when the config is validated: raises ValueError naming the setting; with ``advise``,
    also warns of a decay that leaves the EMA near the initial weights."""
    e = cfg.ema
    if e.rule == "off":
        stray = [k for k in ("evaluate_raw", "warmup") if getattr(e, k)]
        if stray:
            raise ValueError(f"ema.{stray[0]} is set but ema.rule = \"off\"; choose ema.rule from {list(RULES[1:])}")
        return
    strategy = get_algorithm(cfg.algorithm.name).strategy
    hierarchical = hasattr(strategy, "is_central")
    name = cfg.algorithm.name
    if e.rule == "edge" and not hierarchical:
        raise ValueError(f"ema.rule = \"edge\" needs a hierarchy (hierfavg, fedphd), not {name!r}; use \"server\" "
                         "or \"client\"")
    if e.evaluate_raw and strategy.personalized:
        raise ValueError(f"ema.evaluate_raw with {name!r}: its clients' personal models are evaluated one by one, "
                         "not a raw global model")
    if advise and not e.warmup and cfg.train.local_steps:
        planned = cfg.run.num_rounds * cfg.train.local_steps
        left = e.decay ** planned
        if left > 0.1:
            warnings.warn(f"ema.decay = {e.decay:g} per step keeps {100 * left:.0f}% of the initial (random) weights "
                          f"in the EMA after the planned {planned} local steps; lower the decay or set "
                          "ema.warmup = true", stacklevel=2)
    if e.rule == "client":
        if name == "usplit":
            raise ValueError("ema.rule = \"client\" with 'usplit': its clients upload complementary parts, which a "
                             "whole-model EMA from every client would undo; use \"server\"")
        if hierarchical:
            raise ValueError(f"ema.rule = \"client\" with the hierarchy {name!r}: use \"edge\" (edge EMAs synchronized "
                             "at central aggregations) or \"server\"")
        if strategy.personalized:
            raise ValueError(f"ema.rule = \"client\" with {name!r}: its clients keep personal models, which an "
                             "average of client EMAs would mix; use \"server\" (the EMA of the shared parts)")
        if cfg.dp.noise_multiplier:
            raise ValueError("ema.rule = \"client\" with [dp]: the clients' EMAs would reach the server unclipped and "
                             "without noise; use \"server\" (an EMA of the private model is post-processing)")
        if cfg.robust.aggregation != "mean" or cfg.robust.clip_norm or cfg.robust.outlier_factor:
            raise ValueError("ema.rule = \"client\" with [robust] (median, trimmed mean, clipping or outlier screening): "
                             "the clients' EMAs, which are exported, would be averaged unscreened; use \"server\"")


# -- the client half (rule "client") ---------------------------------------------------------------
class EMATerm(LocalTerm):
    """Carries the EMA through the local steps: ``ema <- d_t ema + (1 - d_t) theta`` after each optimizer step.

    The EMA lives in ``store`` (the client's record) under ``prefix``, where the reply is built from.
    """

    def __init__(self, store: StateDict, prefix: str, start: int, decay: float, warmup: bool):
        self.store, self.prefix, self.step, self.decay, self.warmup = store, prefix, start, decay, warmup
        self.pairs: list[tuple[torch.Tensor, torch.nn.Parameter]] = []

    def start(self, names: list[str], params: list[torch.nn.Parameter]) -> None:
        for n, p in zip(names, params):
            key = f"{self.prefix}{n}"
            if key in self.store:
                self.store[key] = self.store[key].to(p.device, p.dtype).clone()
                self.pairs.append((self.store[key], p))

    @torch.no_grad()
    def after_step(self) -> None:
        weight = 1.0 - decay_at(self.step, self.decay, self.warmup)
        for e, p in self.pairs:
            e.lerp_(p.detach(), weight)
        self.step += 1


class EMAClient(ClientHook):
    """The client half of ``ema.rule = "client"``: the EMA term, and the EMA sent back as extras."""

    config_keys = frozenset({"ema_step", "ema_decay", "ema_warmup"})

    def terms(self, task: Task, state) -> list[LocalTerm]:
        if "ema_step" not in task.config:
            return []
        ema = under(task.extras, PREFIX)
        if not ema:
            raise ValueError(f"client {task.client}: the task asks for an EMA (ema_step) but carries none")
        # the reply is built after training from the same record: the EMA waits there, not longer
        for k in [k for k in state.tensors if k.startswith(PENDING)]:
            del state.tensors[k]
        state.tensors.update({f"{PENDING}{k}": v for k, v in ema.items()})
        return [EMATerm(state.tensors, PENDING, int(task.config["ema_step"]), float(task.config["ema_decay"]),
                        bool(task.config.get("ema_warmup", False)))]

    def reply_extras(self, task: Task, state, trained: StateDict, result) -> StateDict:
        if "ema_step" not in task.config:
            return {}
        pending = {k: state.tensors.pop(k) for k in [k for k in state.tensors if k.startswith(PENDING)]}
        return {f"{PREFIX}{k[len(PENDING):]}": v.detach().cpu() for k, v in pending.items()}


# -- the server half --------------------------------------------------------------------------------
class EMAStrategy(StrategyWrapper):
    """``[ema]`` around ``inner``: the EMA kept by the server, the clients or the edges (``rule``)."""

    def __init__(self, inner: Strategy, cfg: Any, train: LocalTrainSpec | None = None):
        super().__init__(inner)
        self.ema_cfg = cfg
        self.train_spec = train  # each client's steps per round (num_steps), as the server knows them
        self.pending_steps: float | None = None  # server rule: the round's steps, applied once its exchanges end
        self.ema: StateDict = {}
        self.ema_step = 0  # global optimizer steps folded into the EMA so far
        self.edge_ema: list[StateDict] = []
        self.edge_steps: list[int] = []
        self.ema_summary: dict[str, Any] = {}

    # -- set-up -------------------------------------------------------------------------------
    def initialize(self, initial: StateDict, spec=None) -> None:
        self.inner.initialize(initial, spec)
        self.ema = clone_state(self.inner.global_state())
        if self.ema_cfg.rule == "edge":
            self.edge_ema = [clone_state(self.ema) for _ in range(self.inner.num_edges)]
            self.edge_steps = [0] * self.inner.num_edges

    def _keep(self, start: int, steps: float) -> float:
        return combined_decay(start, steps, self.ema_cfg.decay, self.ema_cfg.warmup)

    # -- a round --------------------------------------------------------------------------------
    def configure(self, rnd: int) -> list[Task]:
        self.ema_summary = {}
        tasks = self.inner.configure(rnd)
        if self.ema_cfg.rule == "client":
            floating = {f"{PREFIX}{k}": v for k, v in self.ema.items() if v.is_floating_point()}
            for t in tasks:
                t.extras = {**t.extras, **floating}
                t.config = {**t.config, "ema_step": self.ema_step, "ema_decay": self.ema_cfg.decay,
                            "ema_warmup": self.ema_cfg.warmup}
        return tasks

    def expected_extras(self, task: Task) -> StateDict | None:
        inner = self.inner.expected_extras(task)
        if self.ema_cfg.rule != "client":
            return inner
        # checked even when the algorithm declares none: a reply with a missing or misshapen EMA is refused
        return {**(inner or {}), **{f"{PREFIX}{k}": v for k, v in self.ema.items() if v.is_floating_point()}}

    def client_steps(self, reply: Reply) -> int:
        """Local steps of ``reply``'s client this round, from the config and its known size (never its claim)."""
        sizes = self.inner.context.num_samples
        n = sizes[reply.client] if sizes is not None else reply.num_samples
        if self.train_spec is not None:
            return self.train_spec.num_steps(n)
        claimed = float(reply.metrics.get("steps", 0.0))  # no config (a bare strategy in a notebook): the claim
        return int(min(max(claimed, 0.0), MAX_STEPS_PER_ROUND)) if math.isfinite(claimed) else 0

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        rule = self.ema_cfg.rule
        steps = mean_steps(replies, self.client_steps)
        if rule == "client":
            client_emas = [under(r.extras, PREFIX) for r in replies]
            replies = [Reply(r.client, r.tensors, r.num_samples, r.metrics,
                             {k: v for k, v in r.extras.items() if not k.startswith(PREFIX)}, r.claimed_samples)
                       for r in replies]
        metrics = self.inner.aggregate(rnd, replies, failures)
        if rule == "server":  # applied when the round's exchanges are done: a hierarchy's global model changes there
            self.pending_steps = steps
        elif rule == "client":  # weighted as the algorithm weighs its replies
            uniform = getattr(self.inner.cfg, "weighting", "samples") == "uniform"
            mean = weighted_mean(client_emas, [1.0 if uniform else r.num_samples for r in replies])
            self.ema = {k: mean.get(k, v) for k, v in self.inner.global_state().items()}
            self.ema_step += round(steps)
            self.ema_summary = {"clients": len(client_emas)}
        elif rule == "edge":
            pending = self.inner.pending
            for e in sorted({pending[r.client] for r in replies}):
                mine = [r for r in replies if pending[r.client] == e]
                s = mean_steps(mine, self.client_steps)
                keep = self._keep(self.edge_steps[e], s)
                self.edge_ema[e] = ema_update(self.edge_ema[e], self.inner.edges[e], keep)
                self.edge_steps[e] += round(s)
                self.ema_summary[f"edge{e}_keep"] = round(keep, 8)
        return metrics

    def exchange(self, rnd: int, arrived: list[Transfer]) -> list[Transfer]:
        if self.ema_cfg.rule != "edge":
            out = self.inner.exchange(rnd, arrived)
            if not out and self.pending_steps is not None:  # the round is done: the server's EMA of its result
                keep = self._keep(self.ema_step, self.pending_steps)
                self.ema = ema_update(self.ema, self.inner.global_state(), keep)
                self.ema_step += round(self.pending_steps)
                self.ema_summary = {"keep": round(keep, 8)}
                self.pending_steps = None
            return out
        ours = [t for t in arrived if t.meta.get("ema")]
        theirs = [t for t in arrived if not t.meta.get("ema")]
        out = self.inner.exchange(rnd, theirs)
        if not arrived and out:  # edges -> cloud: each edge's EMA goes up with its model
            out += [Transfer(t.src, t.dst, t.link, self.edge_ema[int(t.src.removeprefix("edge"))], {"ema": True}, "up")
                    for t in out]
        elif ours and ours[0].dst == "cloud":  # the cloud averages the EMAs with the models' central weights
            lam = self.inner.central_lambda(theirs)  # the weights the models got
            self.ema = weighted_mean([t.tensors for t in ours], lam.tolist())
            self.ema_step = max(self.edge_steps)
            out += [Transfer("cloud", t.src, t.link, self.ema, {"ema": True}, "down") for t in ours]
            self.ema_summary["synchronized"] = True
        elif ours:  # cloud -> edges: every edge continues from the synchronized EMA
            for t in ours:
                e = int(t.dst.removeprefix("edge"))
                self.edge_ema[e], self.edge_steps[e] = t.tensors, self.ema_step
        return out

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        out = self.inner.round_metrics(rnd)
        if self.ema_summary:
            out["ema"] = {"rule": self.ema_cfg.rule, "step": self.ema_step, **self.ema_summary}
        return out

    # -- what evaluation and export see --------------------------------------------------------
    def global_state(self) -> StateDict:
        """The EMA: evaluated, exported, sampled from."""
        return self.ema

    def personal_model(self, personal: StateDict) -> StateDict:
        """A client's private parts with the EMA of the shared parts."""
        return {**self.inner.personal_model(personal), **select(self.ema, self.inner.shared)}

    def side_models(self) -> dict[str, StateDict]:
        raw = {"raw": self.inner.global_state()} if self.ema_cfg.evaluate_raw else {}
        return {**raw, **self.inner.side_models()}

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        tensors, meta = self.inner.state_dict()
        tensors = {**tensors, **{f"{PREFIX}{k}": v for k, v in self.ema.items()}}
        for e, w in enumerate(self.edge_ema):
            tensors.update({f"{EDGE_PREFIX}{e}/{k}": v for k, v in w.items()})
        return tensors, {**meta, "ema": {"rule": self.ema_cfg.rule, "step": self.ema_step,
                                         "edge_steps": list(self.edge_steps)}}

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        meta = dict(meta)
        saved = meta.pop("ema", None)
        ours = under(tensors, PREFIX)
        if saved is None or not ours:
            raise ValueError("this checkpoint holds no EMA (the run was made with ema.rule = \"off\"); resume it "
                             "with ema.rule = \"off\", or start a new run")
        if saved["rule"] != self.ema_cfg.rule:
            raise ValueError(f"this checkpoint's EMA was kept with ema.rule = {saved['rule']!r}, not "
                             f"{self.ema_cfg.rule!r}; resume with the same rule")
        self.ema, self.ema_step = ours, int(saved["step"])
        self.edge_steps = [int(s) for s in saved["edge_steps"]]
        self.edge_ema = [under(tensors, f"{EDGE_PREFIX}{e}/") for e in range(len(self.edge_steps))]
        self.inner.load_state_dict({k: v for k, v in tensors.items()
                                    if not k.startswith((PREFIX, EDGE_PREFIX))}, meta)


def wrap(strategy: Strategy, cfg: Any) -> Strategy:
    if cfg.ema.rule == "off":
        return strategy
    check(cfg)
    return EMAStrategy(strategy, cfg.ema, train_spec(cfg))  # the steps as the client runtime counts them


def client(cfg: Any) -> ClientHook | None:
    return EMAClient(None) if cfg.ema.rule == "client" else None


# outside DP (the EMA of a private model is post-processing), inside pruning (which restructures the EMA too)
register_wrapper(Wrapper("ema", wrap, client, order=30))
