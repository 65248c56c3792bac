"""The client side of every algorithm: receive tensors, train locally, reply with what was asked.

Engine-agnostic: the simulator calls :meth:`ClientRuntime.handle` in-process, a Flower ClientApp
calls the same method. What a client keeps between rounds lives in :class:`ClientState`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import math

import torch
from diffusers import DDPMScheduler, UNet2DModel

from feddiff.algorithms.aggregate import clone_state
from feddiff.client.train import LocalTrainSpec, train_local
from feddiff.model.parts import select
from feddiff.seeding import global_rng, torch_generator

StateDict = dict[str, torch.Tensor]
KNOWN_TASK_KEYS = {"round", "upload", "personal", "prox_mu"}


def lr_factor(rnd: int, num_rounds: int, schedule: str, min_ratio: float) -> float:
    """The lr multiplier of round ``rnd`` (0-based) of ``num_rounds``: 1, or cosine to ``min_ratio``.

    Rounds past the schedule's end (a run extended on resume) stay at ``min_ratio``.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if num_rounds <= 1:
            return 1.0 if rnd < num_rounds else min_ratio
        progress = min(rnd / (num_rounds - 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose from ['constant', 'cosine']")


@dataclass
class ClientState:
    """What a client keeps between rounds: step count, Adam state, a personal model."""

    steps_done: int = 0
    optimizer: StateDict | None = None
    personal: StateDict | None = None
    tensors: StateDict = field(default_factory=dict)  # room for algorithm state (control variates, residuals)

    def to_flat(self, prefix: str) -> tuple[StateDict, dict[str, Any]]:
        flat: StateDict = {}
        for name, part in (("optimizer", self.optimizer), ("personal", self.personal), ("tensors", self.tensors)):
            for k, v in (part or {}).items():
                flat[f"{prefix}{name}/{k}"] = v
        meta = {"steps_done": self.steps_done, "has_optimizer": self.optimizer is not None,
                "has_personal": self.personal is not None}
        return flat, meta

    @classmethod
    def from_flat(cls, flat: StateDict, meta: dict[str, Any], prefix: str) -> ClientState:
        parts: dict[str, StateDict] = {"optimizer": {}, "personal": {}, "tensors": {}}
        for k, v in flat.items():
            if k.startswith(prefix):
                name, rest = k[len(prefix):].split("/", 1)
                parts[name][rest] = v
        return cls(
            steps_done=int(meta["steps_done"]),
            optimizer=parts["optimizer"] if meta["has_optimizer"] else None,
            personal=parts["personal"] if meta["has_personal"] else None,
            tensors=parts["tensors"],
        )


class ClientRuntime:
    """Runs a client's round on a shared working model (one model object, reused by all clients)."""

    def __init__(
        self, model: UNet2DModel, scheduler: DDPMScheduler, spec: LocalTrainSpec, seed: int,
        keep_optimizer_state: bool = False, num_rounds: int = 1, lr_schedule: str = "constant",
        min_lr_ratio: float = 0.1,
    ):
        self.model = model
        self.scheduler = scheduler
        self.spec = spec
        self.seed = seed
        self.keep_optimizer_state = keep_optimizer_state
        self.num_rounds, self.lr_schedule, self.min_lr_ratio = num_rounds, lr_schedule, min_lr_ratio
        self.device = next(model.parameters()).device

    def handle(
        self, client: int, received: StateDict, config: dict[str, Any], state: ClientState,
        images: torch.Tensor, progress: Callable[[], None] | None = None,
    ) -> tuple[StateDict, int, dict[str, float]]:
        """One round on one client; returns (tensors to upload, num_samples, metrics)."""
        unknown = set(config) - KNOWN_TASK_KEYS
        if unknown:
            raise ValueError(f"client {client}: unknown task keys {sorted(unknown)}; known: {sorted(KNOWN_TASK_KEYS)}")
        rnd = int(config["round"])

        # 1. Local model: the received tensors, over the personal model when the client keeps one
        if config.get("personal"):
            if state.personal is None:
                state.personal = clone_state(received)  # first participation: the full initial model
            state.personal.update({k: v for k, v in received.items()})
            self.model.load_state_dict(state.personal, strict=True)
        else:
            self.model.load_state_dict(received, strict=True)

        # 2. Train
        lr = self.spec.lr * lr_factor(rnd, self.num_rounds, self.lr_schedule, self.min_lr_ratio)
        spec = replace(self.spec, lr=lr, prox_mu=float(config.get("prox_mu", 0.0)))
        gen = torch_generator(self.device, self.seed, "train", rnd, client)
        opt_state = (state.optimizer or {}) if self.keep_optimizer_state else None
        with global_rng(self.device, self.seed, "dropout", rnd, client):
            result = train_local(
                self.model, images, spec, self.scheduler, gen, steps_done=state.steps_done,
                optimizer_state=opt_state, anchor=received if spec.prox_mu > 0 else None, progress=progress,
            )
        state.steps_done += result.num_steps
        if self.keep_optimizer_state:
            state.optimizer = clone_state(result.optimizer_state or {})

        # 3. Reply with the parts the server asked for
        trained = self.model.state_dict()
        if config.get("personal"):
            state.personal = clone_state(trained)
        upload = config.get("upload", "all")
        tensors = trained if upload == "all" else select(trained, upload)
        metrics = {"loss": result.loss, "steps": float(result.num_steps), **result.metrics}
        return tensors, int(images.shape[0]), metrics
