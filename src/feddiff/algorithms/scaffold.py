"""SCAFFOLD: Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020 (https://arxiv.org/abs/1910.06378). A FedPhD baseline.

Server control variate c, client control variates c_i (kept by each client between rounds, in its
record). Each local step uses the corrected gradient g - c_i + c (before clipping). After K local steps
at learning rate lr from the received x to y_i, option II updates the client's control

    c_i+ = c_i - c + (x - y_i) / (K lr)

and the client sends y_i and Delta c_i = c_i+ - c_i. The server, over the sampled set S of N clients:

    x <- x + eta_g * mean_{i in S} (y_i - x)         c <- c + (1/N) sum_{i in S} Delta c_i

(mean: uniform as in the paper, or sample-weighted). Both control variates travel as message extras,
so the ledger counts them (SCAFFOLD doubles the bytes of FedAvg). The correction is derived for plain
SGD; with Adam (``train.optimizer``) it corrects the gradient that Adam then rescales, see
docs/algorithms.md. ``reset_every`` reproduces the authors' reset of every control variate (their repo:
every 10 rounds); 0 never resets.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from feddiff.algorithms.aggregate import weighted_mean
from feddiff.algorithms.base import ClientHook, Failure, Reply, Strategy, StrategyContext, Task
from feddiff.algorithms.registry import Algorithm, register
from feddiff.client.train import LocalTerm
from feddiff.config import F, AlgorithmConfig
from feddiff.types import StateDict, under

STATE = "scaffold/"  # the client's c_i in its record


class ScaffoldConfig(AlgorithmConfig):
    """SCAFFOLD (Karimireddy et al. 2020), option II control variates."""

    name: Literal["scaffold"] = F("scaffold", "algorithm: scaffold")
    global_lr: float = F(1.0, "server step eta_g: x <- x + eta_g * mean(y_i - x)", gt=0)
    weighting: Literal["uniform", "samples"] = F("uniform", "mean over clients: uniform (the paper) or by samples")
    reset_every: int = F(0, "reset every control variate to 0 every N rounds (authors' repo: 10); 0 = never", ge=0)


def control_update(c_i: torch.Tensor, c: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int,
                   lr: float) -> torch.Tensor:
    """Option II: c_i+ = c_i - c + (x - y) / (K lr)."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"SCAFFOLD's control update needs K >= 1 steps and lr > 0, got K={steps}, lr={lr}")
    return c_i - c + (x - y) / (steps * lr)


class ScaffoldTerm(LocalTerm):
    """Adds c - c_i to each parameter's gradient (the corrected gradient g - c_i + c)."""

    def __init__(self, c: StateDict, c_i: StateDict):
        self.c, self.c_i = c, c_i
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start(self, names: list[str], params: list[torch.nn.Parameter]) -> None:
        self.pairs = [(p, (self.c[n] - self.c_i[n]).to(p.device, p.dtype)) for n, p in zip(names, params)]

    def grad(self) -> None:
        for p, corr in self.pairs:
            p.grad.add_(corr)


class ScaffoldClient(ClientHook):
    """The client half: correct every step, then update c_i and send Delta c_i."""

    config_keys = frozenset({"reset_controls"})

    def controls(self, task: Task, state) -> tuple[StateDict, StateDict]:
        """(c, c_i): the server's control from the task, the client's own (zeros the first time)."""
        c = under(task.extras, "c/")
        if task.config.get("reset_controls"):
            for k in [k for k in state.tensors if k.startswith(STATE)]:
                del state.tensors[k]
        c_i = {k: state.tensors.get(f"{STATE}{k}", torch.zeros_like(v)) for k, v in c.items()}
        return c, c_i

    def terms(self, task: Task, state) -> list[LocalTerm]:
        return [ScaffoldTerm(*self.controls(task, state))]

    def reply_extras(self, task: Task, state, trained: StateDict, result) -> StateDict:
        c, c_i = self.controls(task, state)
        out = {}
        for k in c:
            new = control_update(c_i[k], c[k], task.tensors[k].to(c_i[k].dtype), trained[k].detach().cpu(),
                                 result.num_steps, result.lr)
            out[f"dc/{k}"] = new - c_i[k]
            state.tensors[f"{STATE}{k}"] = new
        return out


class Scaffold(Strategy):
    """The server half: send x and c, average the models, move c by the clients' Delta c_i."""

    def __init__(self, cfg: Any, context: StrategyContext):
        super().__init__(cfg, context)
        self.control: StateDict = {}

    def initialize(self, initial: StateDict, spec=None) -> None:
        super().initialize(initial, spec)
        self.control = {k: torch.zeros_like(v) for k, v in self.global_model.items() if v.is_floating_point()}

    def configure(self, rnd: int) -> list[Task]:
        reset = bool(self.cfg.reset_every and rnd and rnd % self.cfg.reset_every == 0)
        if reset:
            self.control = {k: torch.zeros_like(v) for k, v in self.control.items()}
        config = {"round": rnd, "upload": "all", **({"reset_controls": True} if reset else {})}
        extras = {f"c/{k}": v for k, v in self.control.items()}
        return [Task(c, self.global_model, config, extras=extras) for c in self.sample_clients(rnd)]

    def expected_extras(self, task: Task) -> StateDict:
        return {f"dc/{k}": v for k, v in self.control.items()}

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        weights = [1.0] * len(replies) if self.cfg.weighting == "uniform" else [r.num_samples for r in replies]
        mean_y = weighted_mean([r.tensors for r in replies], weights)
        eta = self.cfg.global_lr
        self.global_model = {k: (x + eta * (mean_y[k] - x)) if x.is_floating_point() else mean_y[k]
                             for k, x in self.global_model.items()}
        total_dc = weighted_mean([{k: r.extras[f"dc/{k}"] for k in self.control} for r in replies],
                                 [1.0] * len(replies))  # the mean; times |S|/N below
        scale = len(replies) / self.num_clients
        self.control = {k: v + scale * total_dc[k] for k, v in self.control.items()}
        return {"control_norm": float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.control.values())))}

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        tensors, meta = super().state_dict()
        tensors.update({f"control/{k}": v for k, v in self.control.items()})
        return tensors, meta

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.control = under(tensors, "control/")


register(Algorithm("scaffold", ScaffoldConfig, Scaffold, ScaffoldClient))
