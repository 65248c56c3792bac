"""The local training loop: one explicit function, used by every algorithm and both engines.

Options, not subclasses: a proximal term (FedProx, FedDM-prox), kept optimizer state, and a
warm-up counted over the client's whole life. Later algorithms add their terms here (SCAFFOLD's
control variates, FedPhD's sparsity regulariser), each guarded by its own option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler, UNet2DModel

from feddiff.data.transforms import random_flip, to_model_range
from feddiff.model.diffusion import denoising_loss

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalTrainSpec:
    """What one client does in one round (from ``config.TrainConfig`` plus per-round options)."""

    lr: float
    batch_size: int
    local_epochs: int = 1
    local_steps: int = 0  # > 0 overrides local_epochs
    warmup_steps: int = 0
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    loss: str = "mse"
    random_flip: bool = False
    prox_mu: float = 0.0  # FedProx: + (mu/2) * ||w - w_global||^2
    precision: str = "fp32"  # "bf16": autocast the forward pass to bfloat16

    def num_steps(self, num_samples: int) -> int:
        if self.local_steps > 0:
            return self.local_steps
        return self.local_epochs * math.ceil(num_samples / self.batch_size)


@dataclass
class LocalTrainResult:
    num_steps: int
    loss: float  # mean denoising loss over the round's steps
    metrics: dict[str, float] = field(default_factory=dict)
    optimizer_state: StateDict | None = None


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


def adam_state_to_tensors(opt: torch.optim.Adam, names: list[str]) -> StateDict:
    """Flatten Adam's per-parameter state to named tensors (safetensors-friendly)."""
    out: StateDict = {}
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        st = opt.state.get(p)
        if st:
            out[f"{name}/exp_avg"] = st["exp_avg"]
            out[f"{name}/exp_avg_sq"] = st["exp_avg_sq"]
            out[f"{name}/step"] = st["step"].reshape(1).to(torch.float64)
    return out


def adam_state_from_tensors(opt: torch.optim.Adam, names: list[str], state: StateDict) -> None:
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        if f"{name}/exp_avg" in state:
            opt.state[p] = {
                "step": state[f"{name}/step"].reshape(()).to(torch.float32).cpu(),
                "exp_avg": state[f"{name}/exp_avg"].to(p.device).clone(),
                "exp_avg_sq": state[f"{name}/exp_avg_sq"].to(p.device).clone(),
            }


def train_local(
    model: UNet2DModel,
    images: torch.Tensor,
    spec: LocalTrainSpec,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    *,
    steps_done: int = 0,
    optimizer_state: StateDict | None = None,
    anchor: StateDict | None = None,
    progress: Callable[[], None] | None = None,
) -> LocalTrainResult:
    """Train ``model`` in place on a client's uint8 ``images`` (N, C, H, W) for one round.

    Parameters
    ----------
    steps_done
        The client's optimizer steps in earlier rounds; the lr warm-up continues from there.
    optimizer_state
        Adam state kept from the client's previous round ({} the first time); None: a fresh Adam
        each round (the default) and no state returned.
    anchor
        The weights received this round; required when ``spec.prox_mu > 0``.
    progress
        Called after every optimizer step (progress bars only; it sees nothing of the training).

    Returns the mean loss and, when ``optimizer_state`` was given, the updated optimizer state.
    """
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    num_steps = spec.num_steps(images.shape[0])
    if spec.prox_mu > 0 and anchor is None:
        raise ValueError("train_local: prox_mu > 0 needs the received global weights as anchor")

    # Optimizer: fresh each round unless the client keeps its Adam state
    opt = torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.adam_betas))
    if optimizer_state is not None:
        adam_state_from_tensors(opt, names, optimizer_state)
    prox_pairs = [(p, anchor[n].to(p.device)) for n, p in zip(names, params)] if spec.prox_mu > 0 else []

    model.train()
    loss_sum = torch.zeros((), device=images.device)
    for step, idx in enumerate(_batches(images.shape[0], spec.batch_size, num_steps, generator)):
        # Batch: gather, scale to [-1, 1], optional flip
        x0 = to_model_range(images[idx.to(images.device)])
        if spec.random_flip:
            x0 = random_flip(x0, generator)

        # Loss and gradient
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
            loss = denoising_loss(model, x0, scheduler, generator, spec.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_sum += loss.detach()

        # Proximal term: the gradient of (mu/2)||w - w_global||^2 is mu (w - w_global), added exactly
        for p, p0 in prox_pairs:
            p.grad.add_(p.detach() - p0, alpha=spec.prox_mu)

        # Step: clip, warm-up lr, Adam
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        if spec.warmup_steps > 0:
            opt.param_groups[0]["lr"] = spec.lr * min(1.0, (steps_done + step + 1) / spec.warmup_steps)
        opt.step()
        if progress is not None:
            progress()

    metrics: dict[str, float] = {}
    if prox_pairs:
        with torch.no_grad():
            metrics["prox_dist2"] = float(sum(((p - p0) ** 2).sum() for p, p0 in prox_pairs))
    return LocalTrainResult(
        num_steps=num_steps,
        loss=float(loss_sum) / max(num_steps, 1),
        metrics=metrics,
        optimizer_state=adam_state_to_tensors(opt, names) if optimizer_state is not None else None,
    )
