"""Evaluation during and after training: held-out denoising loss, sample grids, FD / KID / IS.

The held-out loss uses a fixed subset of the test split with fixed timesteps (stratified over
[0, T)) and fixed noise, so it is comparable across rounds and runs with the same seed. Sample
grids and the images scored for FD start from the same noise every time. Every FD line carries
its protocol (feature network, generated and reference images, sampler and steps), and an FD
from the domain network is labelled "FD-domain", never FID.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from feddiff.config import Config, ConfigError, EvalConfig
from feddiff.data.transforms import make_grid, save_png, to_model_range, to_uint8
from feddiff.metrics.fid import FeatureStats
from feddiff.metrics.quality import QualityMetrics, reference_features
from feddiff.model.diffusion import denoising_loss, sample
from feddiff.seeding import numpy_rng, torch_generator

DOMAIN_NET_SEED = 0  # one domain network per dataset, shared by every run, so FD-domain values compare


def cache_dir(cfg: EvalConfig) -> Path:
    """eval.cache_dir, else $FEDDIFF_CACHE, else ~/.cache/feddiff."""
    return Path(cfg.cache_dir or os.environ.get("FEDDIFF_CACHE") or Path.home() / ".cache" / "feddiff")


def load_feature_network(cfg: Config, device: torch.device, log: Callable[[str], None] = print):
    """The configured feature network; the domain network is trained once (cached) when missing."""
    from feddiff.metrics.features import load_feature_net, train_domain_classifier

    e, cdir = cfg.eval, cache_dir(cfg.eval)
    kwargs = dict(dataset=cfg.data.dataset, cache_dir=cdir, root=cfg.data.root, seed=DOMAIN_NET_SEED,
                  inception_weights=e.inception_weights or None)
    try:
        net = load_feature_net(e.feature_net, **kwargs)
    except FileNotFoundError as err:
        if e.feature_net != "domain":
            raise ConfigError(str(err)) from None
        log(f"training the {cfg.data.dataset} domain feature network once (cached in {cdir / 'features'})")
        res = train_domain_classifier(cfg.data.dataset, cfg.data.root, cdir, seed=DOMAIN_NET_SEED, log=log)
        log(f"domain feature network: test accuracy {100 * res.test_accuracy:.2f}% ({res.seconds:.0f} s)")
        net = load_feature_net(e.feature_net, **kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return net.to(device)


def reference_subset(e: EvalConfig, num_images: int) -> np.ndarray | None:
    """The rows of the reference split that make the reference (eval.reference_num_samples); None: all."""
    if 0 < e.reference_num_samples < num_images:
        rng = numpy_rng(DOMAIN_NET_SEED, "reference-subset")
        return np.sort(rng.choice(num_images, e.reference_num_samples, replace=False))
    return None


def reference_key(cfg: Config) -> dict[str, Any]:
    """What the cached reference features depend on, beyond the images themselves."""
    e = cfg.eval
    return {"dataset": cfg.data.dataset, "split": e.reference_split, "image_size": cfg.data.image_size,
            "resize": cfg.data.resize, "subset": e.reference_num_samples}


def build_quality(
    cfg: Config, net, reference_images: torch.Tensor | None, reference_stats: FeatureStats | None = None,
) -> tuple[QualityMetrics, dict[str, Any]]:
    """QualityMetrics against the reference split (cached features) or against summed client stats."""
    e = cfg.eval
    protocol: dict[str, Any] = {
        "metric": net.metric_label, "feature_net": net.name, "feature_weights": net.weights_id,
        "num_generated": e.fid_num_samples, "sampler": e.sampler,
        "steps": e.num_inference_steps or (50 if e.sampler == "ddim" else cfg.diffusion.num_train_timesteps),
        "timestep_spacing": e.timestep_spacing,
    }
    if reference_stats is not None:
        protocol.update(reference="clients' train images (federated feature sums)",
                        reference_size=int(reference_stats.n))
        return QualityMetrics(net, reference_stats, seed=cfg.run.seed), protocol
    assert reference_images is not None
    images = reference_images
    idx = reference_subset(e, len(images))
    if idx is not None:
        images = images[torch.from_numpy(idx)]
    feats = reference_features(net, images, cache_dir=cache_dir(e), key=reference_key(cfg))
    protocol.update(reference=f"{e.reference_split} split", reference_size=len(images))
    return QualityMetrics(net, feats, seed=cfg.run.seed), protocol


class Evaluator:
    def __init__(
        self, cfg: EvalConfig, scheduler: DDPMScheduler, test_images: torch.Tensor | None, seed: int,
        device: torch.device, loss: str = "mse", quality: tuple[QualityMetrics, dict[str, Any]] | None = None,
    ):
        self.cfg = cfg
        self.quality = quality
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

    def quality_metrics(self, model: UNet2DModel, references: dict[str, FeatureStats] | None = None) -> dict[str, Any]:
        """FD / KID / IS of ``fid_num_samples`` images sampled from fixed noise, with their protocol; with
        ``references``, ``fd_vs``: the FD of the same images against each (e.g. clients' own distributions)."""
        assert self.quality is not None
        metrics, protocol = self.quality
        g = torch_generator(self.device, self.seed, "fid-samples")
        images = sample(model, self.scheduler, self.cfg.fid_num_samples, g, self.cfg.sampler,
                        self.cfg.num_inference_steps, self.cfg.timestep_spacing)
        out = metrics.compute(images, references)
        ran = {k: out[k] for k in ("kid_subsets", "kid_subset_size", "is_splits", "is_split_size", "is_left_out") if k in out}
        return {k: out[k] for k in ("fd", "fd_vs", "kid_mean", "kid_std", "is_mean", "is_std") if k in out} | {
            "label": out["label"], "protocol": protocol | ran}

    def __call__(self, model: UNet2DModel, samples_dir: Path, tag: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.heldout is not None:
            out["heldout_loss"] = self.heldout_loss(model)
        if self.quality is not None:
            out.update(self.quality_metrics(model))
        if self.cfg.grid_size > 0:
            out["grid"] = str(self.sample_grid(model, samples_dir / f"{tag}.png").relative_to(samples_dir.parent))
        return out


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean and spread over models (personal models: the papers report the mean over clients)."""
    out: dict[str, float] = {}
    keys = {k for r in results.values() for k, v in r.items() if isinstance(v, (int, float))}
    for k in sorted(keys):
        values = torch.tensor([float(r[k]) for r in results.values() if k in r], dtype=torch.float64)
        out[f"{k}_mean"] = float(values.mean())
        out[f"{k}_std"] = float(values.std()) if len(values) > 1 else 0.0
        out[f"{k}_min"], out[f"{k}_max"] = float(values.min()), float(values.max())
    return out
