"""Image-quality metrics for the engine: cached reference features, federated reference statistics,
and :class:`QualityMetrics`, which scores sampled images with FD / KID (through torchmetrics) and IS
(:func:`equal_split_inception_score`: torchmetrics' formula, on equal splits).

The feature net runs once per image: features and logits come from one pass, and torchmetrics'
metrics receive them through a pass-through ``feature`` module (its ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` would otherwise each run the network again, which for InceptionV3 on a
CPU costs ~0.3 s per image). The real side of the FD is loaded into torchmetrics' state as sums
(:class:`FeatureStats`), so reference statistics summed over clients work as well as features
computed centrally.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from feddiff.data.transforms import to_uint8
from feddiff.metrics.featurenet import FeatureNet, check_images
from feddiff.metrics.features import tensor_sha256
from feddiff.metrics.fid import FeatureStats
from feddiff.seeding import global_rng

REFERENCE_SUBDIR = "reference"
KID_SUBSET_SIZE = 1000  # Binkowski et al.'s default; capped at the number of samples available


def _unit_images(images) -> torch.Tensor:
    """uint8 [0, 255] (tensor or array) -> float32 [0, 1]; float input is taken as already in [0, 1]."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255
    check_images(x, (1, 3), "images")
    return x.to(torch.float32)


@torch.no_grad()
def extract_features(
    net: FeatureNet, images, *, batch_size: int = 256, with_logits: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Features (N, D) float32 of uint8 images, or of float images in [0, 1], in batches.

    Batches run on the net's device; results come back as numpy arrays. With ``with_logits`` also
    returns the logits (N, K) from the same pass.
    """
    if batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    net.eval()
    device = next(net.parameters()).device
    feats, logits = [], []
    for s in range(0, len(images), batch_size):
        x = _unit_images(images[s : s + batch_size]).to(device)
        if with_logits:
            f, z = net.features_and_logits(x)
            logits.append(z.to("cpu", torch.float32).numpy())
        else:
            f = net(x)
        feats.append(f.to("cpu", torch.float32).numpy())
    if not feats:
        raise ValueError("extract_features: no images")
    out = np.concatenate(feats)
    return (out, np.concatenate(logits)) if with_logits else out


def _key_hash(key: dict[str, Any]) -> tuple[str, str]:
    try:
        text = json.dumps(key, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"reference key must be JSON-serialisable (str, numbers, lists), got {key!r}: {err}") from None
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_features(
    net: FeatureNet, images_u8, *, cache_dir: str | os.PathLike, key: dict[str, Any], batch_size: int = 256,
) -> np.ndarray:
    """Features of real images, computed once and cached as ``.npz`` keyed by a hash of ``key``.

    Parameters
    ----------
    net
        The feature network.
    images_u8
        Real images, uint8 (N, C, H, W), as the model sees them (after resizing to its size).
    cache_dir
        Cache root; files go to ``cache_dir/reference/<net>-<hash>.npz``.
    key
        What the features depend on, for people reading the file: dataset, split, image size,
        resize mode, ... The net's name and ``weights_id``, the number of images and a SHA-256 of
        their bytes are added to it (so another folder or changed files never hit a stale entry).
        It is stored in the file.
    batch_size
        Images per forward pass.

    Returns
    -------
    np.ndarray
        float32 (N, num_features).
    """
    full_key = {"feature_net": net.name, "feature_weights": net.weights_id, "num_images": len(images_u8),
                "images_sha256": tensor_sha256(images_u8), **key}
    text, digest = _key_hash(full_key)
    path = Path(cache_dir) / REFERENCE_SUBDIR / f"{net.name}-{digest}.npz"
    if path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == text:
                return z["features"]
    feats = extract_features(net, images_u8, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npz.tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, features=feats, key=np.array(text))
    os.replace(tmp, path)
    return feats


def save_stats(path: str | os.PathLike, stats: FeatureStats) -> Path:
    """Write FeatureStats to ``.npz`` (n, sum, outer), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, n=np.array(stats.n), sum=stats.sum, outer=stats.outer)
    os.replace(tmp, path)
    return path


def load_stats(path: str | os.PathLike) -> FeatureStats:
    with np.load(path) as z:
        return FeatureStats(float(z["n"]), z["sum"], z["outer"])


def federated_reference_stats(client_image_sets: Iterable, net: FeatureNet, batch_size: int = 256) -> FeatureStats:
    """Sum of the FeatureStats each client computes on its own real images.

    Only (n, sum, outer) would leave a client; the sum equals the statistics of all images pooled.
    """
    total: FeatureStats | None = None
    for images in client_image_sets:
        stats = FeatureStats.from_features(extract_features(net, images, batch_size=batch_size))
        total = stats if total is None else total + stats
    if total is None:
        raise ValueError("federated_reference_stats: no client image sets")
    return total


@dataclass(frozen=True)
class SplitInceptionScore:
    """An Inception Score and the splits it ran on.

    ``split_scores`` holds each split's IS; ``mean`` and ``std`` (ddof 1, as torchmetrics; 0 for a
    single split) are over them. ``splits`` splits of ``split_size`` images each were scored, and
    ``left_out`` images (the remainder of N / splits) were not.
    """

    mean: float
    std: float
    splits: int
    split_size: int
    left_out: int
    split_scores: tuple[float, ...]


def equal_split_inception_score(
    logits, splits: int = 10, *, shuffle: bool = True, generator: torch.Generator | None = None,
) -> SplitInceptionScore:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) over ``splits`` splits of equal size.

    Salimans et al. (2016) score 50,000 images in 10 splits of 5,000, p(y) being each split's mean
    prediction, and report the mean and spread over the splits. The IS of a split depends on its
    size (a split of one image scores 1, small splits score lower), so all splits here hold
    the same number of images: ``N // splits`` each, and the ``N % splits`` images left over (fewer
    than ``splits``) are left out. The number of splits is always the one asked for. (torchmetrics'
    ``InceptionScore`` uses ``Tensor.chunk``, which for N = 25 makes 9 splits and for N = 64 leaves a
    one-image last split; the original code's ``i * N // splits`` boundaries keep all images in
    splits whose sizes differ by one.)

    When ``splits`` divides N the result equals torchmetrics' ``InceptionScore`` on the same logits
    and permutation: the same shuffle (``torch.randperm(N)`` from the global RNG unless a
    ``generator`` is given), the same softmax / log-softmax, per-split KL, mean and std with ddof 1.
    Two guards change nothing else: a class with probability 0 contributes 0 (0 log 0 = 0) rather
    than NaN, and a split's mean KL is clamped at 0 (it is never negative mathematically), so
    round-off cannot push an IS below 1 (a one-image split scores 1 up to round-off).

    Parameters
    ----------
    logits
        Class logits (N, K), tensor or array; integers are cast to float64, floats keep their dtype.
    splits
        Number of splits, 1 <= splits <= N.
    shuffle
        Permute the images before splitting, as torchmetrics does; ``False`` splits them in order.
    generator
        Draws the permutation; ``None`` uses torch's global RNG, like torchmetrics (seed it, e.g.
        with :func:`feddiff.seeding.global_rng`, for reproducible numbers).

    Returns
    -------
    SplitInceptionScore
        Mean and std over the splits, and the splits as they ran.

    Raises
    ------
    ValueError
        ``logits`` is not 2-D, ``splits < 1``, or fewer images than splits.
    """
    z = torch.as_tensor(logits)
    if z.ndim != 2:
        raise ValueError(f"equal_split_inception_score: logits must be (N, K), got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        z = z.to(torch.float64)
    n = int(z.shape[0])
    if splits < 1:
        raise ValueError(f"equal_split_inception_score: splits must be >= 1, got {splits}")
    if n < splits:
        raise ValueError(f"equal_split_inception_score: {n} images cannot fill splits={splits} equal splits; "
                         f"use at least {splits} images or fewer splits")
    if shuffle:
        z = z[torch.randperm(n, generator=generator)]
    size = n // splits
    z = z[: splits * size]
    prob, log_prob = z.softmax(dim=1), z.log_softmax(dim=1)
    scores = []
    for p, log_p in zip(prob.split(size), log_prob.split(size)):
        kl = torch.where(p > 0, p * (log_p - p.mean(dim=0, keepdim=True).log()), 0.0)
        scores.append(kl.sum(dim=1).mean().clamp_min(0).exp())
    stacked = torch.stack(scores)
    std = float(stacked.std()) if splits > 1 else 0.0
    return SplitInceptionScore(float(stacked.mean()), std, splits, size, n - splits * size,
                               tuple(float(x) for x in stacked))


class _Passthrough(nn.Module):
    """A torchmetrics ``feature`` module for precomputed features: returns its input."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class QualityMetrics:
    """FD, KID and IS of generated images against fixed real references.

    Parameters
    ----------
    net
        The feature network; its ``metric_label`` ("FID" or "FD-domain") labels the FD.
    reference
        Real features (N, D) -- enables KID -- or only their :class:`FeatureStats` (e.g. summed
        over clients), in which case KID is left out (it needs the features themselves).
    kid_subsets, kid_subset_size
        KID averages over ``kid_subsets`` subsets of ``min(kid_subset_size, N_real, N_fake)``
        samples: the 1000 of Binkowski et al. when there are enough samples, else all of them.
    is_splits
        Inception Score splits, capped at the number of generated images; the splits are of equal
        size and the remainder is left out (:func:`equal_split_inception_score`).
    seed
        Seeds KID's subsets and IS's shuffle (both drawn from the global RNG, which we fork), so
        the same images give the same numbers.
    batch_size
        Images per forward pass of the feature net.
    """

    def __init__(
        self, net: FeatureNet, reference: np.ndarray | FeatureStats, *, kid_subsets: int = 100,
        kid_subset_size: int = KID_SUBSET_SIZE, is_splits: int = 10, seed: int = 0, batch_size: int = 256,
    ) -> None:
        self.net = net
        if isinstance(reference, FeatureStats):
            self.real_features, self.real_stats = None, reference
        else:
            self.real_features = np.asarray(reference, dtype=np.float64)
            self.real_stats = FeatureStats.from_features(self.real_features)
        if self.real_stats.dim != net.num_features:
            raise ValueError(f"reference features have dimension {self.real_stats.dim}, but feature net "
                             f"{net.name!r} gives {net.num_features}")
        if self.real_stats.n < 2:
            raise ValueError(f"need at least 2 reference images, got {self.real_stats.n:g}")
        if kid_subsets < 1 or kid_subset_size < 2 or is_splits < 1:
            raise ValueError(f"QualityMetrics: kid_subsets >= 1, kid_subset_size >= 2 and is_splits >= 1 "
                             f"required; got {kid_subsets}, {kid_subset_size}, {is_splits}")
        self.kid_subsets, self.kid_subset_size, self.is_splits = kid_subsets, kid_subset_size, is_splits
        self.seed, self.batch_size = seed, batch_size

    def compute(self, fake_images: torch.Tensor,
                references: dict[str, FeatureStats] | None = None) -> dict[str, Any]:
        """Score generated images, float in [-1, 1] (N, C, H, W) as the sampler returns them.

        Returns
        -------
        dict
            ``fd`` (the Fréchet distance; ``label`` says whether it is "FID" or "FD-domain"),
            ``kid_mean``, ``kid_std``, ``kid_subsets``, ``kid_subset_size`` (when reference
            features are available), ``is_mean``, ``is_std``, ``is_splits`` (the splits that ran),
            ``is_split_size`` (images in each), ``is_left_out`` (images in no split: N mod
            splits), ``label``, ``feature_net``, ``num_fake``, ``num_real``; with ``references``
            (name -> statistics of another real set, e.g. one client's own distribution), ``fd_vs``:
            name -> the FD of the same generated images against it.
        """
        check_images(fake_images, (1, 3), "QualityMetrics.compute")
        n = int(fake_images.shape[0])
        if n < 2:
            raise ValueError(f"QualityMetrics.compute: need at least 2 generated images, got {n}")
        # quantized to 8 bits like the real side (and like a saved PNG, as pytorch-fid scores them)
        unit = to_uint8(fake_images.detach().to("cpu", torch.float32)).float() / 255
        feats, logits = extract_features(self.net, unit, batch_size=self.batch_size, with_logits=True)
        fake = torch.from_numpy(feats).to(torch.float64)
        out: dict[str, Any] = {"fd": self._fd(fake, self.real_stats)}
        if references:
            out["fd_vs"] = {name: self._fd(fake, stats) for name, stats in references.items()}
        if self.real_features is not None:
            size = min(self.kid_subset_size, len(self.real_features), n)
            out["kid_mean"], out["kid_std"] = self._kid(fake, size)
            out.update(kid_subsets=self.kid_subsets, kid_subset_size=size)  # the protocol as it ran
        score = self._is(torch.from_numpy(logits).to(torch.float64), min(self.is_splits, n))
        out.update(is_mean=score.mean, is_std=score.std, is_splits=score.splits, is_split_size=score.split_size,
                   is_left_out=score.left_out)
        out.update(label=self.net.metric_label, feature_net=self.net.name, num_fake=n,
                   num_real=int(self.real_stats.n))
        return out

    def _fd(self, fake: torch.Tensor, real: FeatureStats) -> float:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=_Passthrough(fake.shape[1]))
        # the real side as sums: exactly what torchmetrics would accumulate from the real features
        metric.real_features_sum = torch.from_numpy(real.sum.copy())
        metric.real_features_cov_sum = torch.from_numpy(real.outer.copy())
        # a count, or a sum of weights (a reweighted reference): torchmetrics only divides by it
        metric.real_features_num_samples = torch.tensor(real.n, dtype=torch.float64)
        metric.update(fake, real=False)
        return float(metric.compute())

    def _kid(self, fake: torch.Tensor, size: int) -> tuple[float, float]:
        from torchmetrics.image.kid import KernelInceptionDistance

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            metric = KernelInceptionDistance(feature=_Passthrough(fake.shape[1]), subsets=self.kid_subsets,
                                             subset_size=size)
        metric.update(torch.from_numpy(self.real_features), real=True)
        metric.update(fake, real=False)
        with global_rng("cpu", self.seed, "kid"):  # torchmetrics draws its subsets from the global RNG
            mean, std = metric.compute()
        return float(mean), float(std)

    def _is(self, logits: torch.Tensor, splits: int) -> SplitInceptionScore:
        with global_rng("cpu", self.seed, "is"):  # the shuffle draws from the global RNG, as torchmetrics'
            return equal_split_inception_score(logits, splits)
