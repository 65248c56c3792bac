"""Leakage measures of a generative model against the images it was trained on: pure functions, no I/O.

- Nearest-neighbour distances between generated and training images, in pixel space (the RMS over pixels
  in [0, 1], so 0 is a copy and values compare across image sizes) or in a feature space.
- The near-copy criterion of Carlini et al. 2023, "Extracting Training Data from Diffusion Models"
  (https://arxiv.org/abs/2301.13188, §5): a generated image x^ is a near-copy of its nearest training
  image x when ``l2(x^, x) / (alpha * mean_{y in S} l2(x^, y)) < threshold``, with S the ``n`` training
  images closest to x^. Normalising by the neighbourhood keeps an image that is merely typical (close
  to many training images) from counting as copied.
- Loss-threshold membership inference (Yeom et al. 2018; Carlini et al. 2023 §6 for diffusion models):
  members have lower denoising loss than held-out images; its ROC AUC (0.5: no signal) and its true
  positive rate at a low false positive rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _flat_unit(images: torch.Tensor) -> torch.Tensor:
    """(N, ...) uint8 [0, 255] or float [0, 1] -> float64 rows in [0, 1]."""
    x = images.reshape(images.shape[0], -1)
    return x.to(torch.float64) / 255 if x.dtype == torch.uint8 else x.to(torch.float64)


def pixel_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """RMS distance over pixels between every image of ``a`` (N, ...) and of ``b`` (M, ...).

    Images are uint8 [0, 255] or float [0, 1]. Returns float64 (N, M): ``sqrt(mean((a_i - b_j)^2))``
    on the [0, 1] scale.
    """
    x, y = _flat_unit(a), _flat_unit(b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"pixel_distances: images of {x.shape[1]} and {y.shape[1]} values cannot be compared")
    out = torch.empty(x.shape[0], y.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        out[s : s + chunk] = torch.cdist(x[s : s + chunk], y)
    return out / x.shape[1] ** 0.5


def nearest(a: torch.Tensor, b: torch.Tensor, k: int, chunk: int = 2048,
            distance=pixel_distances) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest distances from each row of ``a`` to the rows of ``b`` and their indices, ascending.

    ``b`` is read ``chunk`` rows at a time (a client's whole image set never sits in float64 at once).
    Returns float64 (N, min(k, M)) distances and int64 indices into ``b``.
    """
    if len(b) == 0:
        raise ValueError("nearest: no reference rows")
    k = min(k, len(b))
    best_d = torch.empty(len(a), 0, dtype=torch.float64)
    best_i = torch.empty(len(a), 0, dtype=torch.long)
    for s in range(0, len(b), chunk):
        d = distance(a, b[s : s + chunk])
        d_all = torch.cat([best_d, d], dim=1)
        i_all = torch.cat([best_i, torch.arange(s, s + d.shape[1]).expand(len(a), -1)], dim=1)
        best_d, pos = torch.topk(d_all, min(k, d_all.shape[1]), dim=1, largest=False, sorted=True)
        best_i = torch.gather(i_all, 1, pos)
    return best_d, best_i


def feature_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, M) between feature rows ``a`` (N, D) and ``b`` (M, D), float64."""
    return torch.cdist(a.to(torch.float64), b.to(torch.float64))


@dataclass(frozen=True)
class NearCopies:
    """Per generated image: its nearest training image, the distance, the normalised ratio, the verdict."""

    nearest: torch.Tensor  # (N,) index of the closest training image
    distance: torch.Tensor  # (N,) its distance
    ratio: torch.Tensor  # (N,) distance / (alpha * mean distance to the n closest)
    copied: torch.Tensor  # (N,) bool: ratio < threshold
    neighbours: int  # how many nearest distances normalised the ratio (n, or fewer training images)

    @property
    def fraction(self) -> float:
        return float(self.copied.to(torch.float64).mean()) if self.copied.numel() else 0.0


def near_copies(distances: torch.Tensor, alpha: float = 0.5, neighbours: int = 50, threshold: float = 1.0,
                indices: torch.Tensor | None = None) -> NearCopies:
    """Carlini et al.'s criterion.

    Parameters
    ----------
    distances
        (N, M): each generated image's distances to the training images; or, with ``indices``, only its
        nearest ones in ascending order (from :func:`nearest`).
    alpha, neighbours
        The normaliser ``alpha * mean`` of the distances to the ``neighbours`` closest training images,
        the nearest included (all of them when there are fewer).
    threshold
        A ratio below it is a near-copy.
    indices
        The training indices of ``distances``' columns when they are nearest lists.
    """
    if distances.ndim != 2 or distances.shape[1] == 0:
        raise ValueError(f"near_copies: need a (generated, training) distance matrix, got shape {tuple(distances.shape)}")
    if alpha <= 0 or neighbours < 2:
        raise ValueError(f"near_copies: alpha > 0 and neighbours >= 2 required (with one, the ratio is always "
                         f"1 / alpha), got {alpha}, {neighbours}")
    k = min(neighbours, distances.shape[1])
    if indices is None:
        closest, idx = torch.topk(distances, k, dim=1, largest=False, sorted=True)
    else:
        closest, idx = distances[:, :k], indices[:, :k]
    scale = alpha * closest.mean(dim=1)
    ratio = torch.where(scale > 0, closest[:, 0] / scale.clamp_min(torch.finfo(scale.dtype).tiny),
                        torch.zeros_like(scale))  # every neighbour at distance 0: a copy
    return NearCopies(idx[:, 0], closest[:, 0], ratio, ratio < threshold, k)


def membership_auc(member_loss: torch.Tensor, heldout_loss: torch.Tensor) -> float:
    """ROC AUC of the loss-threshold attack: the chance that a member has a lower loss than a held-out image
    (ties count half). 0.5: the losses say nothing of membership."""
    from torchmetrics.functional.classification import binary_auroc

    if not len(member_loss) or not len(heldout_loss):
        raise ValueError("membership_auc: need members and held-out images")
    scores = -torch.cat([member_loss, heldout_loss]).to(torch.float64)
    labels = torch.cat([torch.ones(len(member_loss)), torch.zeros(len(heldout_loss))]).long()
    return float(binary_auroc(scores, labels))


def tpr_at_fpr(member_loss: torch.Tensor, heldout_loss: torch.Tensor, fpr: float = 0.01) -> float:
    """True positive rate of the loss-threshold attack at false positive rate <= ``fpr``: the share of
    members with a loss strictly below the ``floor(fpr * M) + 1``-th smallest of the M held-out losses."""
    if not 0 <= fpr < 1:
        raise ValueError(f"tpr_at_fpr: fpr must be in [0, 1), got {fpr}")
    if not len(heldout_loss) or not len(member_loss):
        raise ValueError("tpr_at_fpr: need members and held-out images")
    held = torch.sort(heldout_loss.to(torch.float64)).values
    allowed = int(fpr * len(held))  # held-out images the threshold may let through (0: strictly under the lowest)
    return float((member_loss.to(torch.float64) < held[allowed]).to(torch.float64).mean())


__all__ = ["NearCopies", "feature_distances", "membership_auc", "near_copies", "nearest", "pixel_distances",
           "tpr_at_fpr"]
