"""The client side of every algorithm: load what arrived, train locally, reply with what was asked.

Engine-agnostic: the simulator calls :meth:`ClientRuntime.handle` in-process, a Flower ClientApp calls
the same method in its own process. What a client keeps between rounds lives in one record,
:class:`ClientState`, which serialises to tensors plus JSON (a checkpoint, or Flower's ``Context.state``).
What each algorithm adds on the client comes from its :class:`~feddiff.algorithms.base.ClientHook`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from feddiff.algorithms.base import ClientHook, Reply, Task
from feddiff.client.train import LocalTrainSpec, train_local
from feddiff.model.parts import select
from feddiff.model.spec import ModelSpec
from feddiff.seeding import global_rng, torch_generator
from feddiff.types import StateDict, clone_state

# task config keys every client understands; an algorithm's hook adds its own (ClientHook.config_keys)
BASE_TASK_KEYS = frozenset({"round", "upload", "personal"})


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
    """What a client keeps between rounds, as one record.

    ``tensors`` holds the link's state (``rx/`` copy, ``ef/`` residual) and algorithm state under each
    hook's own prefix (control variates); ``spec`` is the model spec the client last received (None:
    the spec its config builds).
    """

    steps_done: int = 0
    optimizer: StateDict | None = None
    personal: StateDict | None = None
    tensors: StateDict = field(default_factory=dict)
    spec: dict[str, Any] | None = None

    def copy(self) -> ClientState:
        """A record that can change without changing this one (tensors are shared: they are replaced, never
        written in place)."""
        return ClientState(self.steps_done, dict(self.optimizer) if self.optimizer is not None else None,
                           dict(self.personal) if self.personal is not None else None, dict(self.tensors),
                           self.spec)

    def to_flat(self, prefix: str = "") -> tuple[StateDict, dict[str, Any]]:
        """(tensors named ``<prefix><part>/<name>``, JSON meta): the record as a checkpoint stores it."""
        flat: StateDict = {}
        for name, part in (("optimizer", self.optimizer), ("personal", self.personal), ("tensors", self.tensors)):
            for k, v in (part or {}).items():
                flat[f"{prefix}{name}/{k}"] = v
        meta: dict[str, Any] = {"steps_done": self.steps_done, "has_optimizer": self.optimizer is not None,
                                "has_personal": self.personal is not None}
        if self.spec is not None:
            meta["spec"] = self.spec
        return flat, meta

    @classmethod
    def from_flat(cls, flat: StateDict, meta: dict[str, Any], prefix: str = "") -> ClientState:
        """Read back what :meth:`to_flat` wrote (other keys of ``flat`` are ignored)."""
        parts: dict[str, StateDict] = {"optimizer": {}, "personal": {}, "tensors": {}}
        for k, v in flat.items():
            name, sep, rest = k[len(prefix):].partition("/") if k.startswith(prefix) else ("", "", "")
            if sep and name in parts:
                parts[name][rest] = v
        return cls(
            steps_done=int(meta["steps_done"]),
            optimizer=parts["optimizer"] if meta["has_optimizer"] else None,
            personal=parts["personal"] if meta["has_personal"] else None,
            tensors=parts["tensors"],
            spec=meta.get("spec"),
        )


class ClientRuntime:
    """Runs a client's round on a working model per model spec (one model object, reused by all clients).

    Parameters
    ----------
    model_for
        ``model_for(spec)``: the working model of an architecture (built once per spec and cached).
    base_spec
        The spec the config builds (a client that was never sent another uses it).
    hook
        The algorithm's client half.
    """

    def __init__(
        self, model_for: Callable[[ModelSpec], UNet2DModel], base_spec: ModelSpec, scheduler: DDPMScheduler,
        spec: LocalTrainSpec, seed: int, hook: ClientHook | None = None, keep_optimizer_state: bool = False,
        num_rounds: int = 1, lr_schedule: str = "constant", min_lr_ratio: float = 0.1, shared: bool = False,
    ):
        self.model_for = model_for
        self.base_spec = base_spec
        self.scheduler = scheduler
        self.spec = spec
        self.seed = seed
        self.hook = hook or ClientHook(None)
        self.keep_optimizer_state = keep_optimizer_state
        self.num_rounds, self.lr_schedule, self.min_lr_ratio = num_rounds, lr_schedule, min_lr_ratio
        # train.optimizer_scope = "shared": one optimizer record for every client (FedPhD's code), kept here
        self.shared: ClientState | None = ClientState(optimizer={}) if shared else None

    def model_spec(self, state: ClientState) -> ModelSpec:
        """The architecture this client trains now."""
        return ModelSpec.from_json(state.spec) if state.spec is not None else self.base_spec

    def handle(
        self, task: Task, state: ClientState, images: torch.Tensor, progress: Callable[[], None] | None = None,
    ) -> Reply:
        """One round on one client: ``task`` as the client decoded it; returns its reply (not yet encoded)."""
        client, config = task.client, task.config
        unknown = set(config) - BASE_TASK_KEYS - self.hook.config_keys
        if unknown:
            known = sorted(BASE_TASK_KEYS | self.hook.config_keys)
            raise ValueError(f"client {client}: unknown task keys {sorted(unknown)}; known: {known}")
        rnd = int(config["round"])
        model = self.model_for(self.model_spec(state))
        device = next(model.parameters()).device

        # 1. Local model: the received tensors, over the personal model when the client keeps one
        received = task.tensors
        if config.get("personal"):
            if state.personal is None:
                state.personal = clone_state(received)  # first participation: the full initial model
            state.personal.update({k: v for k, v in received.items()})
            model.load_state_dict(state.personal, strict=True)
        else:
            model.load_state_dict(received, strict=True)

        # 2. Train, with what the algorithm adds
        lr = self.spec.lr * lr_factor(rnd, self.num_rounds, self.lr_schedule, self.min_lr_ratio)
        spec = replace(self.spec, lr=lr)
        gen = torch_generator(device, self.seed, "train", rnd, client)
        holder = self.shared if self.shared is not None else state  # whose optimizer and warm-up count
        if holder is self.shared and self.shared.spec != state.spec:  # the model was pruned: a fresh optimizer
            self.shared.optimizer, self.shared.spec = {}, state.spec
        keep = self.keep_optimizer_state or self.shared is not None
        opt_state = (holder.optimizer or {}) if keep else None
        terms = self.hook.terms(task, state)
        with global_rng(device, self.seed, "dropout", rnd, client):
            result = train_local(model, images, spec, self.scheduler, gen, steps_done=holder.steps_done,
                                 optimizer_state=opt_state, terms=terms, progress=progress)
        state.steps_done += result.num_steps
        if self.shared is not None:
            self.shared.steps_done += result.num_steps
        if keep:
            holder.optimizer = clone_state(result.optimizer_state or {})

        # 3. Reply with the parts the server asked for, and the algorithm's extras
        trained = model.state_dict()
        if config.get("personal"):
            state.personal = clone_state(trained)
        upload = config.get("upload", "all")
        tensors = trained if upload == "all" else select(trained, upload)
        extras = self.hook.reply_extras(task, state, trained, result)
        metrics = {"loss": result.loss, "steps": float(result.num_steps), **result.metrics}
        return Reply(client, tensors, int(images.shape[0]), metrics, extras)
