"""Feature networks for FD / KID / IS, chosen by name: ``inception`` (FID) and ``domain`` (FD-domain).

Every feature net is an ``nn.Module`` that takes float images in [0, 1], shape (N, C, H, W) at any
size, resizes them to its own input internally, and returns float32 features (N, num_features);
``logits`` gives (N, num_classes) for the Inception Score. Its ``metric_label`` names the number it
produces: only the FID InceptionV3 with the published weights gives "FID"; a distance in the
feature space of our own classifier is "FD-domain" and must never be reported as FID.

``domain`` is a small CNN classifier trained offline on the dataset's own train split
(:func:`train_domain_classifier`), cached under ``cache_dir/features/`` as safetensors plus a JSON
of its settings, named by a hash of those settings and of the train labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from feddiff.data.sources import DatasetError, ImageData, load_dataset
from feddiff.data.transforms import fit_to_size, to_model_range
from feddiff.metrics.featurenet import FeatureNet, check_images
from feddiff.metrics.inception import load_inception
from feddiff.seeding import global_rng, torch_generator

FEATURES_SUBDIR = "features"
DOMAIN_ARCH_VERSION = 1  # bump when DomainNet changes: old caches then no longer match
DOMAIN_MAX_SIZE = 64  # larger images (CelebA) are classified at 64 px; cost grows with area
DOMAIN_EPOCHS = 3  # Fashion-MNIST test accuracy: 2 epochs 90.8%, 3 epochs 91.5%, 4 epochs 91.9% (seed 0)


# ----------------------------------------------------------------------------------------------
# The domain classifier


class DomainNet(nn.Module):
    """A small CNN classifier; its penultimate layer (128 units after ReLU) gives the features.

    Three stride-2 conv-BN-ReLU layers (32, 64, 128 channels), an adaptive average pool to 4x4,
    fc(2048 -> 128), fc(128 -> classes). Stride-2 convolutions instead of conv + max-pool make it
    ~4x cheaper on CPU; BatchNorm lets three epochs of Adam reach ~91.5% on Fashion-MNIST.
    """

    name = "domain"
    metric_label = "FD-domain"
    num_features = 128

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if in_channels not in (1, 3) or image_size < 8 or num_classes < 2:
            raise ValueError(f"DomainNet: need 1 or 3 channels, image_size >= 8 and >= 2 classes; got "
                             f"in_channels={in_channels}, image_size={image_size}, num_classes={num_classes}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc1 = nn.Linear(128 * 16, self.num_features)
        self.fc2 = nn.Linear(self.num_features, num_classes)
        self.weights_id = "random-init"

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 1|3, H, W) -> the net's input: its channels and size, in [-1, 1]."""
        check_images(images, (1, 3), "DomainNet")
        x = images.to(torch.float32)
        if x.shape[1] != self.in_channels:
            # gray -> RGB by repetition; RGB -> gray with ITU-R 601 weights, as PIL's convert("L")
            # (which the image-folder reader uses for gray folders)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else (
                x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-2:] != (self.image_size, self.image_size):
            # the same bilinear + antialias resize as data.transforms.fit_to_size
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return 2 * x - 1  # the net is trained on to_model_range(uint8), i.e. [-1, 1]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(self.trunk(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) float32 of float images in [0, 1], any size."""
        return self._features(self.prepare(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.forward(images))

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.forward(images)
        return feats, self.fc2(feats)


def build_domain_net(in_channels: int, image_size: int, num_classes: int, seed: int = 0) -> DomainNet:
    """An untrained DomainNet initialised from ``seed`` (global RNG state is restored)."""
    with global_rng("cpu", seed, "domain-init"):
        return DomainNet(in_channels, image_size, num_classes)


@dataclass(frozen=True)
class DomainResult:
    """A trained (or cached) domain classifier: weights file, test accuracy, training seconds."""

    path: Path
    test_accuracy: float
    seconds: float
    cached: bool = False


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """16 hex digits of SHA-256 over the tensors' dtypes, shapes and bytes: a key for data-derived caches."""
    h = hashlib.sha256()
    for t in tensors:
        arr = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.data)
    return h.hexdigest()[:16]


def _domain_settings(
    dataset: str, seed: int, epochs: int, batch_size: int, lr: float, train: ImageData,
) -> dict[str, Any]:
    return {
        "dataset": dataset, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "arch_version": DOMAIN_ARCH_VERSION, "in_channels": train.channels,
        "image_size": min(int(train.images.shape[-1]), DOMAIN_MAX_SIZE), "num_classes": train.num_classes,
        "data_sha256": tensor_sha256(train.images, train.labels),
    }  # fmt: skip


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_size(dataset: str) -> int | None:
    """CelebA's files are large: read them straight at the net's largest input size."""
    return DOMAIN_MAX_SIZE if dataset == "celeba" else None


def _square(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    return images if (h, w) == (size, size) else fit_to_size(images, size, "center-crop" if h != w else "resize")


@torch.no_grad()
def domain_accuracy(net: DomainNet, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` on uint8 images (N, C, H, W)."""
    was_training = net.training
    net.eval()
    correct = 0
    for s in range(0, len(labels), batch_size):
        x = images_u8[s : s + batch_size].to(torch.float32) / 255
        correct += int((net.logits(x).argmax(1) == labels[s : s + batch_size]).sum())
    net.train(was_training)
    return correct / max(1, len(labels))


def train_domain_classifier(
    dataset: str, root: str, cache_dir: str | os.PathLike, seed: int = 0, epochs: int = DOMAIN_EPOCHS,
    batch_size: int = 128, lr: float = 2e-3, retrain: bool = False, log: Callable[[str], None] | None = None,
) -> DomainResult:
    """Train the ``domain`` feature net on the train split of ``dataset`` and cache it.

    Deterministic for a seed on one machine with the same number of torch threads (the thread
    count changes the order of float reductions): the initialisation and every shuffle come from
    generators derived from ``seed``. Adam with a cosine decay to zero; on Fashion-MNIST three
    epochs reach about 91.5% test accuracy (~25-40 s on 1-2 CPU cores when not contended).

    Parameters
    ----------
    dataset, root
        As for :func:`feddiff.data.sources.load_dataset`.
    cache_dir
        The weights go to ``cache_dir/features/domain-<dataset>-<hash>.safetensors`` with a JSON
        beside it; the hash covers every setting below, the architecture version and the labels.
    seed, epochs, batch_size, lr
        Training settings.
    retrain
        Train even if a cached net with the same settings exists.
    log
        Called with one line per epoch (e.g. ``print``).

    Returns
    -------
    DomainResult
        The weights path, the test accuracy (on the test split, or on a seeded 10% hold-out of
        train for image folders without one) and the training seconds; ``cached`` is True when
        nothing was trained.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"train_domain_classifier: epochs and batch_size must be >= 1 and lr > 0, "
                         f"got epochs={epochs}, batch_size={batch_size}, lr={lr}")
    train = load_dataset(dataset, root, "train", _read_size(dataset))
    settings = _domain_settings(dataset, seed, epochs, batch_size, lr, train)
    folder = Path(cache_dir) / FEATURES_SUBDIR
    stem = f"domain-{dataset}-{_settings_hash(settings)}"
    weights, meta_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if meta_path.is_file() and weights.is_file() and not retrain:
        meta = json.loads(meta_path.read_text())
        return DomainResult(weights, meta["test_accuracy"], meta["seconds"], cached=True)

    # data: bring to the net's square input size once; hold out 10% when there is no test split
    size = settings["image_size"]
    x_train, y_train = _square(train.images, size), train.labels
    try:
        test = load_dataset(dataset, root, "test", _read_size(dataset))
        x_test, y_test, test_split = _square(test.images, size), test.labels, "test"
    except DatasetError:
        if dataset != "image-folder":  # only image folders may lack a test split
            raise
        perm = torch.randperm(len(y_train), generator=torch_generator("cpu", seed, "domain-holdout"))
        cut = len(perm) // 10
        x_test, y_test, test_split = x_train[perm[:cut]], y_train[perm[:cut]], "train-holdout-10%"
        x_train, y_train = x_train[perm[cut:]], y_train[perm[cut:]]

    # model and optimiser, both seeded
    net = build_domain_net(train.channels, size, train.num_classes, seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch_generator("cpu", seed, "domain-shuffle")
    n = len(y_train)
    total_steps, step = epochs * math.ceil(n / batch_size), 0

    # training: plain epochs over seeded permutations; cosine decay lets the last steps settle
    start = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(net.fc2(net._features(to_model_range(x_train[idx]))), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if log:
            log(f"domain net {dataset}: epoch {epoch + 1}/{epochs} loss {loss.item():.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    net.eval()
    accuracy = domain_accuracy(net, x_test, y_test)

    # cache: weights first, then the JSON that marks the entry complete (both written atomically)
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata={"stem": stem})
    os.replace(tmp, weights)
    meta = {**settings, "hash": stem.rsplit("-", 1)[1], "test_accuracy": accuracy, "test_split": test_split,
            "seconds": round(seconds, 2), "torch": torch.__version__}
    tmp_json = meta_path.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp_json, meta_path)
    return DomainResult(weights, accuracy, seconds)


def load_domain_net(dataset: str, root: str, cache_dir: str | os.PathLike, seed: int = 0) -> DomainNet:
    """The cached domain net for ``dataset`` (its train split at ``root``) and ``seed``.

    Among cached nets that match (several epoch counts, say), the one with the best test accuracy
    is taken. Raises FileNotFoundError naming the command that trains one if none is cached.
    """
    train = load_dataset(dataset, root, "train", _read_size(dataset))
    data_hash = tensor_sha256(train.images, train.labels)
    folder = Path(cache_dir) / FEATURES_SUBDIR
    matches = []
    for meta_path in sorted(folder.glob(f"domain-{dataset}-*.json")):
        meta = json.loads(meta_path.read_text())
        weights = meta_path.with_suffix(".safetensors")
        if (meta.get("arch_version") == DOMAIN_ARCH_VERSION and meta.get("seed") == seed
                and meta.get("data_sha256") == data_hash and weights.is_file()):
            matches.append((-meta["test_accuracy"], meta_path.name, meta, weights))
    if not matches:
        raise FileNotFoundError(
            f"no trained domain feature net for dataset {dataset!r} (seed {seed}, this train split) in "
            f"{folder}; train one with `feddiff features train --dataset {dataset}` (about a minute on "
            "a CPU), or choose the 'inception' feature net with a local weights file"
        )
    _, _, meta, weights = min(matches, key=lambda m: m[:2])
    from safetensors.torch import load_file

    net = DomainNet(meta["in_channels"], meta["image_size"], meta["num_classes"])
    net.load_state_dict(load_file(str(weights)))
    net.weights_id = meta["hash"]
    net.requires_grad_(False)
    return net.eval()


# ----------------------------------------------------------------------------------------------
# The registry


def _load_inception(*, dataset: str, cache_dir, inception_weights, root: str, seed: int):
    return load_inception(inception_weights)


def _load_domain(*, dataset: str, cache_dir, inception_weights, root: str, seed: int):
    return load_domain_net(dataset, root, cache_dir, seed)


FEATURE_NETS: dict[str, Callable[..., nn.Module]] = {
    "inception": _load_inception,
    "domain": _load_domain,
}


def load_feature_net(
    name: str, *, dataset: str, cache_dir: str | os.PathLike, inception_weights: str | os.PathLike | None = None,
    root: str = "", seed: int = 0,
) -> FeatureNet:
    """Load a feature network by name, in eval mode, from local files only.

    Parameters
    ----------
    name
        ``"inception"`` (FID; weights from ``inception_weights`` or ``$FEDDIFF_INCEPTION_WEIGHTS``)
        or ``"domain"`` (FD-domain; the classifier cached by :func:`train_domain_classifier`).
    dataset, root, seed
        Which domain net: the dataset and its folder, and the seed it was trained with.
    cache_dir
        The folder holding ``features/``.
    inception_weights
        Path of the InceptionV3 weights file.
    """
    if name not in FEATURE_NETS:
        raise ValueError(f"unknown feature net {name!r}; choose from {sorted(FEATURE_NETS)}")
    return FEATURE_NETS[name](dataset=dataset, cache_dir=cache_dir, inception_weights=inception_weights,
                              root=root, seed=seed)
