"""Assemble one experiment from a config: data, partition, model, schedule, strategy, client runtime.

Both engines start here, so a run means the same thing in the simulator and on Flower.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from feddiff.algorithms import Strategy, make_strategy
from feddiff.client.runtime import ClientRuntime
from feddiff.client.train import LocalTrainSpec
from feddiff.compress.channel import LinkSpec
from feddiff.compress.codecs import make_codec
from feddiff.config import Config, ConfigError, LinkConfig
from feddiff.data.partition import Partition, label_histograms, make_partition, partition_hash
from feddiff.data.sources import ImageData, load_dataset
from feddiff.data.transforms import fit_to_size
from feddiff.model.diffusion import make_scheduler
from feddiff.model.presets import build_unet, unet_kwargs
from feddiff.seeding import derive_seed, numpy_rng


def pick_device(name: str, deterministic: bool = True) -> torch.device:
    """The torch device for ``run.device``; on CUDA, deterministic kernels unless asked otherwise."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility (read at first use)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # ops without a deterministic CUDA kernel warn instead of failing the run
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


# (height, width) of the datasets whose size is fixed, to refuse an impossible "pad" before reading
NATIVE_SIZES = {"fashion-mnist": (28, 28), "cifar10": (32, 32), "celeba": (218, 178)}


def load_split(cfg: Config, split: str) -> ImageData:
    """Read a split and bring it to the configured size (once, at load time)."""
    d = cfg.data
    native = NATIVE_SIZES.get(d.dataset)
    if d.resize == "pad" and native and max(native) > d.image_size:
        raise ConfigError(f"data.resize='pad' cannot shrink {d.dataset}'s {native[0]}x{native[1]} images to "
                          f"data.image_size={d.image_size}; use resize = 'resize' or 'center-crop', or a size "
                          f">= {max(native)}")
    # readers of image files resize as they read ("pad" keeps the native size for fit_to_size)
    hint = None if cfg.data.resize == "pad" else cfg.data.image_size
    raw = load_dataset(cfg.data.dataset, cfg.data.root, split, hint)
    images = fit_to_size(raw.images, cfg.data.image_size, cfg.data.resize)
    return ImageData(raw.name, split, images, raw.labels, raw.class_names)


def train_subset(cfg: Config, num_train: int) -> np.ndarray:
    """Indices of the train split in use: all, or a seeded subset of ``max_train_samples``."""
    n = cfg.data.max_train_samples
    if n == 0 or n >= num_train:
        return np.arange(num_train)
    return np.sort(numpy_rng(cfg.run.seed, "train-subset").choice(num_train, n, replace=False))


def partition_train(cfg: Config, labels: np.ndarray) -> tuple[np.ndarray, Partition]:
    """(subset, parts): parts index the train split itself, not the subset."""
    subset = train_subset(cfg, len(labels))
    p = cfg.partition
    local = make_partition(
        p.method, labels[subset], p.num_clients, derive_seed(cfg.run.seed, "partition"),
        alpha=p.alpha, min_samples=p.min_samples, classes_per_client=p.classes_per_client,
        shard_rule=p.shard_rule,
    )
    return subset, [subset[part] for part in local]


def partition_record(cfg: Config, train: ImageData, parts: Partition) -> dict:
    """What partition.json holds: sizes, label histograms, indices, and the samples no client got."""
    labels = train.labels.numpy()
    hist = label_histograms(labels, parts, train.num_classes)
    in_use = np.bincount(labels[train_subset(cfg, len(labels))], minlength=train.num_classes)
    unused = in_use - hist.sum(0)  # e.g. classes that no client drew in a pathological split
    return {
        "method": cfg.partition.method,
        "num_clients": cfg.partition.num_clients,
        "params": cfg.partition.model_dump(),
        "seed": cfg.run.seed,
        "hash": partition_hash(parts),
        "classes": train.class_names,
        "sizes": [len(p) for p in parts],
        "label_histograms": hist.tolist(),
        "unused_samples": int(unused.sum()),
        "unused_per_class": unused.tolist(),
        "indices": [p.tolist() for p in parts],
    }


def model_kwargs(cfg: Config, in_channels: int) -> dict:
    m = cfg.model
    return unet_kwargs(
        m.preset, in_channels, cfg.data.image_size, block_out_channels=m.block_out_channels,
        layers_per_block=m.layers_per_block, norm_num_groups=m.norm_num_groups,
        attention_levels=m.attention_levels, dropout=m.dropout,
    )


def train_spec(cfg: Config) -> LocalTrainSpec:
    t = cfg.train
    return LocalTrainSpec(
        lr=t.lr, batch_size=t.batch_size, local_epochs=t.local_epochs, local_steps=t.local_steps,
        warmup_steps=t.warmup_steps, grad_clip=t.grad_clip, adam_betas=tuple(t.adam_betas),
        loss=cfg.diffusion.loss, random_flip=cfg.data.random_flip, precision=t.precision,
    )


def link_spec(link: LinkConfig) -> LinkSpec:
    """A configured direction of the link: codec, weights or delta, error feedback."""
    quantized = link.codec in ("int8", "int4")
    kwargs = {"scheme": link.scheme, "stochastic_rounding": link.stochastic_rounding} if quantized else {}
    return LinkSpec(make_codec(link.codec, **kwargs), link.mode, link.error_feedback)


@dataclass
class Experiment:
    cfg: Config
    device: torch.device
    train: ImageData
    test: ImageData | None
    parts: Partition
    client_images: list[torch.Tensor]
    model: UNet2DModel
    scheduler: DDPMScheduler
    strategy: Strategy
    runtime: ClientRuntime

    @property
    def num_clients(self) -> int:
        return len(self.parts)


def build_experiment(cfg: Config) -> Experiment:
    device = pick_device(cfg.run.device, cfg.run.deterministic)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    train = load_split(cfg, "train")
    try:
        test: ImageData | None = load_split(cfg, "test")
    except FileNotFoundError:
        if cfg.eval.loss_num_samples > 0 and cfg.data.dataset != "image-folder":
            raise
        test = None
    _, parts = partition_train(cfg, train.labels.numpy())
    client_images = [train.images[torch.from_numpy(p)].to(device) for p in parts]

    model = build_unet(model_kwargs(cfg, train.channels), derive_seed(cfg.run.seed, "model-init")).to(device)
    d = cfg.diffusion
    scheduler = make_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
    strategy = make_strategy(cfg.algorithm, len(parts), cfg.run.seed)
    t = cfg.train
    runtime = ClientRuntime(model, scheduler, train_spec(cfg), cfg.run.seed, t.keep_optimizer_state,
                            t.lr_schedule_rounds or cfg.run.num_rounds, t.lr_schedule, t.min_lr_ratio)
    return Experiment(cfg, device, train, test, parts, client_images, model, scheduler, strategy, runtime)
