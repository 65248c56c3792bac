"""Assemble one experiment from a config: data, partition, model, schedule, strategy, client runtime.

Both engines start here, so a run means the same thing in the simulator and on Flower.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from feddiff.algorithms import Strategy, StrategyContext, client_hook, make_strategy
from feddiff.client.node import ClientData
from feddiff.client.runtime import ClientRuntime
from feddiff.client.train import train_spec
from feddiff.compress.channel import LinkSpec
from feddiff.compress.link import LinkSpecs
from feddiff.compress.codecs import make_codec
from feddiff.config import Config, ConfigError, LinkConfig
from feddiff.data.partition import Partition, label_histograms, make_partition, partition_hash
from feddiff.data.sources import ImageData, load_dataset
from feddiff.data.transforms import fit_to_size
from feddiff.model.diffusion import make_scheduler
from feddiff.model.presets import count_parameters, unet_kwargs
from feddiff.model.spec import ModelSpec, build_model
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
    """Indices of the train split in use: all, or a seeded subset of ``data.max_train_samples``.

    The subset is part of the data split, so it is drawn from ``partition.seed`` (``run.seed`` when
    that is unset, which gives the subsets of feddiff before ``partition.seed`` existed).

    Parameters
    ----------
    cfg : Config
        The run's config (``data.max_train_samples``, ``partition.seed``, ``run.seed``).
    num_train : int
        Size of the whole train split.

    Returns
    -------
    numpy.ndarray
        Sorted indices into the train split.
    """
    n = cfg.data.max_train_samples
    if n == 0 or n >= num_train:
        return np.arange(num_train)
    seed = cfg.run.seed if cfg.partition.seed is None else cfg.partition.seed
    return np.sort(numpy_rng(seed, "train-subset").choice(num_train, n, replace=False))


def partition_train(cfg: Config, labels: np.ndarray) -> tuple[np.ndarray, Partition]:
    """The train subset in use and its division over the clients.

    Both derive from ``partition.seed``, or ``run.seed`` when that is unset (the split of feddiff
    before ``partition.seed`` existed), so runs that differ in ``run.seed`` alone can share a split.

    Parameters
    ----------
    cfg : Config
        The run's config (``partition.*``, ``data.max_train_samples``, ``run.seed``).
    labels : numpy.ndarray
        Labels of the whole train split.

    Returns
    -------
    subset : numpy.ndarray
        Indices of the train split in use (see ``train_subset``).
    parts : Partition
        One index array per client; they index the train split itself, not the subset.
    """
    subset = train_subset(cfg, len(labels))
    p = cfg.partition
    seed = cfg.run.seed if p.seed is None else p.seed
    local = make_partition(
        p.method, labels[subset], p.num_clients, derive_seed(seed, "partition"),
        alpha=p.alpha, min_samples=p.min_samples, classes_per_client=p.classes_per_client,
        shard_rule=p.shard_rule,
    )
    return subset, [subset[part] for part in local]


def partition_record(cfg: Config, train: ImageData, parts: Partition) -> dict:
    """What partition.json holds: sizes, label histograms, indices, and the samples no client got.

    Parameters
    ----------
    cfg : Config
        The run's config.
    train : ImageData
        The whole train split.
    parts : Partition
        The clients' indices into it, from ``partition_train``.

    Returns
    -------
    dict
        The record. ``seed`` is the root seed the split was drawn from: ``partition.seed``, or
        ``run.seed`` when that is unset (``params.seed`` keeps the setting itself).
    """
    labels = train.labels.numpy()
    hist = label_histograms(labels, parts, train.num_classes)
    in_use = np.bincount(labels[train_subset(cfg, len(labels))], minlength=train.num_classes)
    unused = in_use - hist.sum(0)  # e.g. classes that no client drew in a pathological split
    return {
        "method": cfg.partition.method,
        "num_clients": cfg.partition.num_clients,
        "params": cfg.partition.model_dump(),
        "seed": cfg.run.seed if cfg.partition.seed is None else cfg.partition.seed,
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


def link_spec(link: LinkConfig) -> LinkSpec:
    """A configured direction of the link: codec, weights or delta, error feedback."""
    quantized = link.codec in ("int8", "int4")
    kwargs = {"scheme": link.scheme, "stochastic_rounding": link.stochastic_rounding} if quantized else {}
    return LinkSpec(make_codec(link.codec, **kwargs), link.mode, link.error_feedback)


def link_specs(cfg: Config) -> LinkSpecs:
    """Both directions of the client links, from ``[compress]``."""
    return LinkSpecs(link_spec(cfg.compress.downlink), link_spec(cfg.compress.uplink))


def model_spec(cfg: Config, in_channels: int) -> ModelSpec:
    """The spec the config builds: the preset with its overrides, no structural history."""
    return ModelSpec(model_kwargs(cfg, in_channels))


class ModelCache:
    """One working model per architecture (model spec), on the run's device, built on first use."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.seed = seed
        self.models: dict[str, UNet2DModel] = {}

    def __call__(self, spec: ModelSpec) -> UNet2DModel:
        if spec.id not in self.models:
            self.models[spec.id] = build_model(spec, self.seed).to(self.device)
        return self.models[spec.id]


@dataclass(frozen=True)
class DeclaredData:
    """The clients' data as they declared it, where the server holds none of it (Flower nodes with their own
    data): each client's number of training images, their channels and the class names in label order."""

    sizes: tuple[int, ...]
    channels: int
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def record(self, cfg: Config) -> dict:
        """What partition.json holds for such a run: the declared sizes, no indices or histograms."""
        return {"method": "own-data", "num_clients": len(self.sizes), "hash": self.hash(), "sizes": list(self.sizes),
                "channels": self.channels, "classes": list(self.classes), "declared": True,
                "note": "each node trains on its own data; sizes as the nodes declared them"}

    @classmethod
    def of_run(cls, record: dict) -> DeclaredData | None:
        """The declaration a run's partition.json holds (a run of nodes with their own data), else None."""
        if record.get("method") != "own-data":
            return None
        return cls(tuple(int(n) for n in record["sizes"]), int(record["channels"]), tuple(record["classes"]))

    def hash(self) -> str:
        import hashlib
        import json

        what = ["own-data", list(self.sizes), self.channels, list(self.classes)]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


@dataclass
class Experiment:
    """One run assembled in one process: the server's parts and every client's (the simulator's view).

    ``num_samples`` is each client's train-set size from the partition: the aggregation weights, never
    what a client claims. Where the server holds no training data (``declared``: Flower nodes with their
    own), ``train`` and ``parts`` are None, there is no ``client_data``, and the sizes are the ones the
    nodes declared before round 1.
    """

    cfg: Config
    device: torch.device
    train: ImageData | None
    test: ImageData | None
    parts: Partition | None
    client_data: list[ClientData]
    spec: ModelSpec
    model_for: ModelCache
    scheduler: DDPMScheduler
    strategy: Strategy
    runtime: ClientRuntime
    links: LinkSpecs
    declared: DeclaredData | None = None

    @property
    def num_clients(self) -> int:
        return len(self.num_samples)

    @property
    def num_samples(self) -> tuple[int, ...]:
        if self.parts is None:
            assert self.declared is not None
            return self.declared.sizes
        return tuple(len(p) for p in self.parts)

    @property
    def channels(self) -> int:
        """Image channels (the model's input)."""
        return self.train.channels if self.train is not None else self.declared.channels

    def partition_hash(self) -> str:
        """What identifies the clients' data (a resume refuses a run whose data now divide otherwise)."""
        return partition_hash(self.parts) if self.parts is not None else self.declared.hash()

    def partition_record(self) -> dict:
        """partition.json: the partition (sizes, histograms, indices), or the nodes' declared sizes."""
        if self.parts is None:
            return self.declared.record(self.cfg)
        return partition_record(self.cfg, self.train, self.parts)

    @property
    def client_images(self) -> list[torch.Tensor]:
        return [d.images for d in self.client_data]

    @property
    def model(self) -> UNet2DModel:
        """The working model of the initial architecture."""
        return self.model_for(self.spec)

    def chosen_clients(self, clients: list[int] | None) -> list[int]:
        """``clients`` (None: every client), each checked to exist; a bad id is a ConfigError naming it."""
        if clients is None:
            return list(range(self.num_clients))
        bad = [k for k in clients if not 0 <= k < self.num_clients]
        if bad:
            raise ConfigError(f"clients {bad} do not exist; this run has clients 0..{self.num_clients - 1}")
        return list(clients)

    def steps_per_round(self, client: int) -> int:
        """Optimizer steps client ``client`` takes in a round."""
        return self.runtime.spec.num_steps(self.num_samples[client])

    def banner(self, start_round: int, run_dir) -> str:
        """The line a run prints first."""
        cfg = self.cfg
        sizes = self.num_samples
        return (
            f"[bold]feddiff[/bold] {cfg.algorithm.name} | {cfg.data.dataset} {cfg.data.image_size}px, "
            f"{self.num_clients} clients ({'own data' if self.parts is None else cfg.partition.method}, sizes "
            f"{min(sizes)}..{max(sizes)}) | "
            f"{cfg.model.preset} U-Net {count_parameters(self.model) / 1e6:.2f}M params | {self.device} | "
            f"rounds {start_round + 1}..{cfg.run.num_rounds} -> {run_dir.path}"
        )


def build_experiment(cfg: Config, declared: DeclaredData | None = None) -> Experiment:
    """Read the data, partition it, build the model, the strategy and the client runtime.

    ``declared``: the clients hold their own data, as declared (Flower nodes): no training image is read
    here, and the declared sizes are the aggregation weights.
    """
    device = pick_device(cfg.run.device, cfg.run.deterministic)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    if declared is not None and len(declared.sizes) != cfg.partition.num_clients:
        raise ConfigError(f"{len(declared.sizes)} clients declared their data; partition.num_clients = "
                          f"{cfg.partition.num_clients}")
    train = load_split(cfg, "train") if declared is None else None
    try:
        test: ImageData | None = load_split(cfg, "test")
    except FileNotFoundError:
        if cfg.eval.loss_num_samples > 0 and cfg.data.dataset != "image-folder":
            raise
        test = None
    if declared is not None and test is not None and test.channels != declared.channels:
        raise ConfigError(f"the nodes declare {declared.channels}-channel images; the server's test split has "
                          f"{test.channels} ({cfg.data.dataset} under {cfg.data.root or 'its default folder'!r})")
    if declared is None:
        _, parts = partition_train(cfg, train.labels.numpy())
        client_data = [ClientData(train.images[torch.from_numpy(p)].to(device), train.labels[torch.from_numpy(p)],
                                  train.num_classes) for p in parts]
        sizes, channels = tuple(len(p) for p in parts), train.channels
    else:
        parts, client_data, sizes, channels = None, [], declared.sizes, declared.channels

    spec = model_spec(cfg, channels)
    models = ModelCache(device, derive_seed(cfg.run.seed, "model-init"))
    d = cfg.diffusion
    scheduler = make_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
    strategy = make_strategy(cfg, StrategyContext(len(sizes), cfg.run.seed, spec, sizes))
    t = cfg.train
    runtime = ClientRuntime(models, spec, scheduler, train_spec(cfg), cfg.run.seed, client_hook(cfg),
                            t.keep_optimizer_state, t.lr_schedule_rounds or cfg.run.num_rounds, t.lr_schedule,
                            t.min_lr_ratio, shared=t.optimizer_scope == "shared")
    return Experiment(cfg, device, train, test, parts, client_data, spec, models, scheduler, strategy, runtime,
                      link_specs(cfg), declared)
