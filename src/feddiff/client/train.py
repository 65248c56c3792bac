"""The local training loop: one explicit function, used by every algorithm and both engines.

Options, not subclasses: the optimizer (Adam or SGD), kept optimizer state, and a warm-up counted
over the client's whole life. What an algorithm adds (FedProx's proximal pull, SCAFFOLD's gradient
correction, a sparsity regulariser, DP clipping) comes as :class:`LocalTerm` objects that the
algorithm's client hook builds; the loop calls them at fixed points of every step and knows none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler, UNet2DModel

from feddiff.data.transforms import random_flip, to_model_range
from feddiff.model.diffusion import denoising_loss

from feddiff.types import StateDict


class LocalTerm:
    """Something an algorithm adds to every local step. Each method is called at one fixed point.

    The loop calls :meth:`start` once with the parameters, then per step: :meth:`loss` (added to the
    denoising loss before ``backward``), :meth:`grad` (after ``backward``, before clipping: edit
    ``p.grad`` in place), :meth:`before_step` (after clipping, before the step), :meth:`after_step`
    (after the optimizer step); :meth:`metrics` at the end.
    """

    def start(self, names: list[str], params: list[torch.nn.Parameter]) -> None:
        """Called once before the first step with the model's parameters and their names."""

    def loss(self, model: torch.nn.Module) -> torch.Tensor | None:
        """An extra loss term of this step (None: nothing)."""
        return None

    def grad(self) -> None:
        """Edit the gradients in place (after backward, before clipping)."""

    def before_step(self) -> None:
        """Called after clipping, just before the optimizer step (DP noise goes here)."""

    def after_step(self) -> None:
        """Called after each optimizer step."""

    def metrics(self) -> dict[str, float]:
        """Metrics of the round, merged into the client's reply."""
        return {}


@dataclass(frozen=True)
class LocalTrainSpec:
    """What one client does in one round (from ``config.TrainConfig`` plus per-round options)."""

    lr: float
    batch_size: int
    optimizer: str = "adam"  # "adam" | "sgd"
    momentum: float = 0.0  # sgd
    local_epochs: int = 1
    local_steps: int = 0  # > 0 overrides local_epochs
    warmup_steps: int = 0
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    loss: str = "mse"
    random_flip: bool = False
    precision: str = "fp32"  # "bf16": autocast the forward pass to bfloat16

    def num_steps(self, num_samples: int) -> int:
        if self.local_steps > 0:
            return self.local_steps
        return self.local_epochs * math.ceil(num_samples / self.batch_size)


def train_spec(cfg) -> LocalTrainSpec:
    """What every client does in a round, from the run config's ``[train]`` (and the loss and flips)."""
    t = cfg.train
    return LocalTrainSpec(
        lr=t.lr, batch_size=t.batch_size, optimizer=t.optimizer, momentum=t.momentum, local_epochs=t.local_epochs,
        local_steps=t.local_steps, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip,
        adam_betas=tuple(t.adam_betas), loss=cfg.diffusion.loss, random_flip=cfg.data.random_flip,
        precision=t.precision,
    )


@dataclass
class LocalTrainResult:
    num_steps: int
    loss: float  # mean denoising loss over the round's steps
    metrics: dict[str, float] = field(default_factory=dict)
    optimizer_state: StateDict | None = None
    lr: float = 0.0  # the round's base learning rate (SCAFFOLD's option II divides by K * lr)


def _batches(n: int, batch_size: int, num_steps: int, generator: torch.Generator):
    """Index batches: seeded permutations, epoch after epoch, the last batch of an epoch may be short."""
    done = 0
    while done < num_steps:
        perm = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]
            done += 1
            if done == num_steps:
                return


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(spec: LocalTrainSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The local optimizer of ``spec``: Adam (betas) or SGD (momentum)."""
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.adam_betas))
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose from {list(OPTIMIZERS)}")


def optimizer_state_to_tensors(opt: torch.optim.Optimizer, names: list[str]) -> StateDict:
    """Flatten the per-parameter state (Adam moments and step, SGD momentum) to named tensors."""
    out: StateDict = {}
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        st = opt.state.get(p)
        if not st:
            continue
        for key, value in st.items():
            if value is None:  # SGD without momentum keeps momentum_buffer = None
                continue
            out[f"{name}/{key}"] = value.reshape(1).to(torch.float64) if key == "step" else value
    return out


def optimizer_state_from_tensors(opt: torch.optim.Optimizer, names: list[str], state: StateDict) -> None:
    """Load what :func:`optimizer_state_to_tensors` wrote into ``opt`` (parameters in the same order)."""
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        prefix = f"{name}/"
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            continue
        restored = {}
        for key, value in own.items():
            if key == "step":
                restored[key] = value.reshape(()).to(torch.float32).cpu()
            else:
                restored[key] = value.to(p.device).clone()
        opt.state[p] = restored


def train_local(
    model: UNet2DModel,
    images: torch.Tensor,
    spec: LocalTrainSpec,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    *,
    steps_done: int = 0,
    optimizer_state: StateDict | None = None,
    terms: Sequence[LocalTerm] = (),
    progress: Callable[[], None] | None = None,
) -> LocalTrainResult:
    """Train ``model`` in place on a client's uint8 ``images`` (N, C, H, W) for one round.

    Parameters
    ----------
    steps_done
        The client's optimizer steps in earlier rounds; the lr warm-up continues from there.
    optimizer_state
        Optimizer state kept from the client's previous round ({} the first time); None: a fresh
        optimizer each round (the default) and no state returned.
    terms
        What the algorithm adds to each step (:class:`LocalTerm`), in order.
    progress
        Called after every optimizer step (progress bars only; it sees nothing of the training).

    Returns the mean denoising loss, the terms' metrics and, when ``optimizer_state`` was given, the
    updated optimizer state.
    """
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    num_steps = spec.num_steps(images.shape[0])

    # Optimizer: fresh each round unless the client keeps its state
    opt = make_optimizer(spec, params)
    if optimizer_state is not None:
        optimizer_state_from_tensors(opt, names, optimizer_state)
    for term in terms:
        term.start(names, params)

    model.train()
    loss_sum = torch.zeros((), device=images.device)
    for step, idx in enumerate(_batches(images.shape[0], spec.batch_size, num_steps, generator)):
        # Batch: gather, scale to [-1, 1], optional flip
        x0 = to_model_range(images[idx.to(images.device)])
        if spec.random_flip:
            x0 = random_flip(x0, generator)

        # Loss and gradient: the denoising loss plus the algorithm's loss terms
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
            loss = denoising_loss(model, x0, scheduler, generator, spec.loss)
        objective = loss
        for term in terms:
            extra = term.loss(model)
            if extra is not None:
                objective = objective + extra
        opt.zero_grad(set_to_none=True)
        objective.backward()
        loss_sum += loss.detach()

        # Gradient terms (proximal pull, control-variate correction), exactly, before clipping
        for term in terms:
            term.grad()

        # Step: clip, warm-up lr, optimizer
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        if spec.warmup_steps > 0:
            opt.param_groups[0]["lr"] = spec.lr * min(1.0, (steps_done + step + 1) / spec.warmup_steps)
        for term in terms:
            term.before_step()
        opt.step()
        for term in terms:
            term.after_step()
        if progress is not None:
            progress()

    metrics: dict[str, float] = {}
    for term in terms:
        metrics.update(term.metrics())
    return LocalTrainResult(
        num_steps=num_steps,
        loss=float(loss_sum) / max(num_steps, 1),
        metrics=metrics,
        optimizer_state=optimizer_state_to_tensors(opt, names) if optimizer_state is not None else None,
        lr=spec.lr,
    )
