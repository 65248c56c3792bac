"""Evaluation during and after training: held-out denoising loss and sample grids.

The held-out loss uses a fixed subset of the test split with fixed timesteps (stratified over
[0, T)) and fixed noise, so it is comparable across rounds and runs with the same seed. Sample
grids start from the same noise every time, so successive grids show the same "seeds" improving.
Image-quality metrics (FID/KID/IS) plug in here as further entries of the returned dict.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from feddiff.config import EvalConfig
from feddiff.data.transforms import make_grid, save_png, to_model_range, to_uint8
from feddiff.model.diffusion import denoising_loss, sample
from feddiff.seeding import numpy_rng, torch_generator


class Evaluator:
    def __init__(
        self, cfg: EvalConfig, scheduler: DDPMScheduler, test_images: torch.Tensor | None, seed: int,
        device: torch.device, loss: str = "mse",
    ):
        self.cfg = cfg
        self.scheduler = scheduler
        self.seed = seed
        self.device = device
        self.loss = loss
        self.heldout: torch.Tensor | None = None
        if test_images is not None and cfg.loss_num_samples > 0:
            n = min(cfg.loss_num_samples, test_images.shape[0])
            idx = numpy_rng(seed, "eval-subset").choice(test_images.shape[0], n, replace=False)
            self.heldout = to_model_range(test_images[torch.from_numpy(idx)]).to(device)
            T = scheduler.config.num_train_timesteps
            g = torch_generator("cpu", seed, "eval-noise")
            self.timesteps = (torch.arange(n) * T // n)[torch.randperm(n, generator=g)].to(device)
            self.noise = torch.randn(self.heldout.shape, generator=g).to(device)

    @torch.no_grad()
    def heldout_loss(self, model: UNet2DModel, batch_size: int = 256) -> float:
        """Mean denoising loss on the fixed held-out set (fixed t and noise)."""
        assert self.heldout is not None
        model.eval()
        total = 0.0
        for s in range(0, self.heldout.shape[0], batch_size):
            x0 = self.heldout[s : s + batch_size]
            loss = denoising_loss(model, x0, self.scheduler, None, self.loss,
                                  timesteps=self.timesteps[s : s + batch_size], noise=self.noise[s : s + batch_size])
            total += float(loss) * x0.shape[0]
        model.train()
        return total / self.heldout.shape[0]

    def sample_grid(self, model: UNet2DModel, path: Path, num_images: int | None = None) -> Path:
        """Sample ``grid_size`` images from fixed noise and save them as one PNG."""
        n = num_images or self.cfg.grid_size
        g = torch_generator(self.device, self.seed, "grid")
        images = sample(model, self.scheduler, n, g, self.cfg.sampler, self.cfg.num_inference_steps,
                        self.cfg.timestep_spacing)
        size = images.shape[-1]
        return save_png(make_grid(to_uint8(images).cpu()), path, scale=max(1, math.ceil(64 / size)))

    def __call__(self, model: UNet2DModel, samples_dir: Path, tag: str) -> dict[str, float | str]:
        out: dict[str, float | str] = {}
        if self.heldout is not None:
            out["heldout_loss"] = self.heldout_loss(model)
        if self.cfg.grid_size > 0:
            out["grid"] = str(self.sample_grid(model, samples_dir / f"{tag}.png").relative_to(samples_dir.parent))
        return out
