"""DDPM pieces kept apart from the network: noise schedule, training loss, DDPM/DDIM sampling.

The schedule and samplers are diffusers' ``DDPMScheduler`` and ``DDIMScheduler``; the U-Net knows
nothing about betas. Epsilon prediction throughout (Ho et al. 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

LOSSES = ("mse", "huber")


def make_scheduler(
    num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> DDPMScheduler:
    """The training noise schedule (and the DDPM sampler), epsilon prediction, x0 clipped to [-1, 1]."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
        beta_end=beta_end, prediction_type="epsilon", clip_sample=True,
    )


def denoising_loss(
    model: UNet2DModel, x0: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator,
    loss: str = "mse", timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss between the true and predicted noise at uniformly drawn timesteps.

    ``timesteps`` and ``noise`` may be given (held-out evaluation uses fixed ones); otherwise they
    are drawn from ``generator``.
    """
    n = x0.shape[0]
    T = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = torch.randint(0, T, (n,), generator=generator, device=generator.device).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    eps = model(x_t, timesteps).sample
    if loss == "mse":
        return F.mse_loss(eps, noise)
    if loss == "huber":
        return F.smooth_l1_loss(eps, noise)  # de Goede et al.: Huber with beta 1
    raise ValueError(f"unknown loss {loss!r}; choose from {list(LOSSES)}")


@torch.no_grad()
def sample(
    model: UNet2DModel, train_scheduler: DDPMScheduler, num_images: int, generator: torch.Generator,
    sampler: str = "ddim", num_inference_steps: int = 50, timestep_spacing: str = "trailing",
    batch_size: int = 64, eta: float = 0.0,
) -> torch.Tensor:
    """Generate images in [-1, 1], shape (N, C, H, W), with DDIM (eta=0 by default) or ancestral DDPM.

    ``num_inference_steps=0`` with ``sampler="ddpm"`` runs all T steps (de Goede et al.'s protocol).
    """
    cfg = model.config
    device = next(model.parameters()).device
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(train_scheduler.config, timestep_spacing=timestep_spacing)
        sched.set_timesteps(num_inference_steps or 50)
    elif sampler == "ddpm":
        sched = DDPMScheduler.from_config(train_scheduler.config, timestep_spacing=timestep_spacing)
        sched.set_timesteps(num_inference_steps or train_scheduler.config.num_train_timesteps)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose from ['ddim', 'ddpm']")
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator,
                        device=generator.device).to(device)
        for t in sched.timesteps:
            eps = model(x, t).sample
            if sampler == "ddim":
                x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
            else:
                x = sched.step(eps, t, x, generator=generator).prev_sample
        out.append(x.clamp(-1, 1))
    model.train(was_training)
    return torch.cat(out)
