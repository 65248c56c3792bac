"""Structured pruning around any strategy (FedPhD's one-shot pruning, Long et al. 2025, §1.7 of the notes).

Server side (:class:`PruneStrategy`): before round ``at`` (0 = at init) the server prunes the global model
once, records the step in the model spec (ratio, importance, Torch-Pruning's history) and brings the whole
state of the strategy it wraps to the new architecture with the same indices: the global model, a
hierarchy's edge models, SCAFFOLD's server control variate. The round loop then sends each node the new
spec (small JSON) once; the node replays it on its own copy and prunes its own record alike (personal
models, control variates, error-feedback residuals; its optimizer restarts, as in FedPhD's code). Every
message after that carries the smaller weights.

Client side (:class:`SparsityClient`): in the rounds before pruning (``at >= 1``), a group-norm sparsity
regulariser lambda * sum_g ||W_g||_2 whose exact gradient is added to each step, so channels the pruner
will drop shrink first. ``channel`` groups are each weight's output channels (group lasso, the default);
``tensor`` is FedPhD's code, ``torch.norm(W.view(out, -1))``: one Frobenius norm per weight, which shrinks
whole tensors rather than channels.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from feddiff.algorithms.base import ClientHook, Strategy, StrategyWrapper, Task
from feddiff.algorithms.registry import Wrapper, register_wrapper
from feddiff.client.train import LocalTerm
from feddiff.model.presets import count_parameters
from feddiff.model.spec import build_model
from feddiff.prune.structure import KIND, index_maps, prune_model, restructure
from feddiff.types import StateDict, under


class PruneStrategy(StrategyWrapper):
    """Prunes the wrapped strategy's model once, before round ``cfg.at`` (``"init"``: round 0).

    Parameters
    ----------
    inner
        Any strategy; its state must round-trip through ``state_dict``/``load_state_dict`` (resume needs that too).
    cfg
        The ``[prune]`` section.
    """

    def __init__(self, inner: Strategy, cfg: Any):
        super().__init__(inner)
        self.prune_cfg = cfg
        self.prune_round = 0 if cfg.at == "init" else int(cfg.at)
        self.prune_event: dict[str, Any] | None = None  # what the pruning round records in metrics.jsonl
        self.before_update: StateDict | None = None  # taylor: the global model one round before pruning

    @property
    def pruned(self) -> bool:
        return self.inner.spec is not None and any(s.get("kind") == KIND for s in self.inner.spec.history)

    def configure(self, rnd: int) -> list[Task]:
        if not self.pruned:
            if rnd >= self.prune_round:
                self.prune(rnd)
            elif self.prune_cfg.importance == "taylor" and rnd == self.prune_round - 1:
                self.before_update = {k: v.clone() for k, v in self.inner.global_model.items()}
        tasks = self.inner.configure(rnd)
        if not self.pruned and self.prune_cfg.sparsity > 0:  # sparse training before the pruning round
            for t in tasks:
                t.config["sparsity"] = float(self.prune_cfg.sparsity)
                t.config["sparsity_norm"] = self.prune_cfg.sparsity_norm
        return tasks

    def prune(self, rnd: int) -> None:
        """Prune the global model and bring every tensor of the inner strategy to the new architecture.

        Channels are ranked on the trained model itself (``global_model``), not on what is evaluated
        (``global_state()``: an EMA lags behind it).
        """
        spec = self.inner.spec
        if spec is None:
            raise ValueError("pruning needs the strategy's model spec (StrategyContext.spec)")
        model = build_model(spec, 0)
        model.load_state_dict(self.inner.global_model)
        params_before = count_parameters(model)
        importance, gradients = self.prune_cfg.importance, None
        if importance == "taylor":
            gradients = self.update_direction(rnd)
            if gradients is None:
                importance = "magnitude"
        step = prune_model(model, self.prune_cfg.ratio, importance, gradients)
        step["round"] = rnd + 1  # 1-based, as metrics.jsonl counts: pruned before this round trained
        new = spec.with_step(step)
        tensors, meta = self.inner.state_dict()
        tensors = restructure(tensors, index_maps(spec, new))
        meta["spec"] = new.to_json()
        self.inner.load_state_dict(tensors, meta)
        self.before_update = None
        self.prune_event = {"round": rnd + 1, "ratio": step["ratio"], "importance": step["importance"],
                            "parameters_before": params_before, "parameters_after": count_parameters(model)}

    def update_direction(self, rnd: int) -> StateDict | None:
        """Taylor's gradient stand-in: the global model's change over the last round (w_before - w_now).

        With one local SGD step per client this is lr times the federated gradient; with more steps or Adam
        it is the aggregate update, a first-order saliency of the same sign convention. None (the caller
        ranks by magnitude, and says so) when there is no update to use: the round before gave no usable
        reply, or the snapshot was not kept.
        """
        now = self.inner.global_model
        delta = None if self.before_update is None else {k: self.before_update[k] - now[k] for k in now}
        if delta is None or not any(bool(d.any()) for d in delta.values()):
            warnings.warn(f"prune.importance = 'taylor': the global model did not change in round {rnd} (no usable "
                          "reply?), so there is no update to rank channels by; pruning by magnitude", stacklevel=2)
            return None
        return delta

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        out = self.inner.round_metrics(rnd)
        if self.prune_event is not None:  # reported once, with the first round that has replies
            out["pruned"], self.prune_event = self.prune_event, None
        return out

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        tensors, meta = self.inner.state_dict()
        if self.before_update is not None:
            tensors.update({f"prune-before/{k}": v for k, v in self.before_update.items()})
        return tensors, meta

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        before = under(tensors, "prune-before/")
        self.before_update = before or None
        self.inner.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("prune-before/")}, meta)


class SparsityTerm(LocalTerm):
    """lambda * sum_g ||W_g||_2 over the weights, its exact (sub)gradient added before clipping.

    Parameters
    ----------
    weight
        lambda.
    norm
        ``channel``: groups are output channels (rows of ``W.view(out, -1)``), ``conv_out`` excluded (its
        outputs are never pruned); ``tensor``: one group per weight, every weight (FedPhD's code).
    """

    def __init__(self, weight: float, norm: str):
        if norm not in ("channel", "tensor"):
            raise ValueError(f"unknown sparsity norm {norm!r}; choose from ['channel', 'tensor']")
        self.weight, self.norm = weight, norm
        self.params: list[torch.nn.Parameter] = []

    def start(self, names: list[str], params: list[torch.nn.Parameter]) -> None:
        self.params = [p for n, p in zip(names, params)
                       if "weight" in n and not (self.norm == "channel" and n.startswith("conv_out."))]

    def _norms(self, p: torch.Tensor) -> torch.Tensor:
        rows = p.detach().reshape(p.shape[0], -1)
        return rows.norm(dim=1, keepdim=True) if self.norm == "channel" else rows.norm().reshape(1, 1)

    def grad(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            rows = p.detach().reshape(p.shape[0], -1)
            norms = self._norms(p)
            # d||w||/dw = w / ||w||; 0 at w = 0 (the subgradient that keeps a zero group at zero)
            g = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), torch.zeros_like(rows))
            p.grad.add_(g.view_as(p), alpha=self.weight)

    def metrics(self) -> dict[str, float]:
        with torch.no_grad():
            return {"sparsity_reg": float(sum(self._norms(p).sum() for p in self.params))}


class SparsityClient(ClientHook):
    """The client half of pruning: the sparsity regulariser while the task asks for it."""

    config_keys = frozenset({"sparsity", "sparsity_norm"})

    def terms(self, task: Task, state) -> list[LocalTerm]:
        weight = float(task.config.get("sparsity", 0.0))
        return [SparsityTerm(weight, task.config.get("sparsity_norm", "channel"))] if weight > 0 else []


def wrap(strategy: Strategy, cfg: Any) -> Strategy:
    """``[prune]`` with a ratio > 0: the strategy wrapped in :class:`PruneStrategy`."""
    return PruneStrategy(strategy, cfg.prune) if cfg.prune.ratio > 0 else strategy


def client(cfg: Any) -> ClientHook | None:
    """The sparsity regulariser's hook when sparse training comes before pruning."""
    p = cfg.prune
    return SparsityClient(None) if p.ratio > 0 and p.at != "init" and p.sparsity > 0 else None


# outermost: pruning restructures every tensor of the strategies inside it
register_wrapper(Wrapper("prune", wrap, client, order=100))
