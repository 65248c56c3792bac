"""What every feature network shares: the :class:`FeatureNet` protocol, the input check, and where the
InceptionV3 weights file comes from.

Both :mod:`feddiff.metrics.features` (the registry and the domain classifier) and
:mod:`feddiff.metrics.inception` (the FID InceptionV3) import this module; it imports neither, so
the two never import each other in a cycle.
"""

from __future__ import annotations

from typing import Protocol

import torch

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release asset
INCEPTION_WEIGHTS_FILE_FIDELITY = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's
INCEPTION_WEIGHTS_PAGE = "https://github.com/mseitzer/pytorch-fid/releases/tag/fid_weights"
INCEPTION_WEIGHTS_ENV = "FEDDIFF_INCEPTION_WEIGHTS"


class FeatureNet(Protocol):
    """What the metrics need from a feature network."""

    name: str
    metric_label: str
    num_features: int
    num_classes: int
    weights_id: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...
    def logits(self, images: torch.Tensor) -> torch.Tensor: ...
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def check_images(images: torch.Tensor, channels: tuple[int, ...], who: str) -> None:
    """Raise ValueError unless ``images`` is a float (N, C, H, W) batch with C in ``channels``.

    Parameters
    ----------
    images
        The batch to check.
    channels
        The channel counts allowed, e.g. ``(1, 3)``.
    who
        Names the caller in the message.

    Raises
    ------
    ValueError
        Not a floating-point 4-D tensor, or a channel count outside ``channels``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}: expected float images in [0, 1] of shape (N, C, H, W), got {desc}")
    if images.shape[1] not in channels:
        raise ValueError(f"{who}: images have {images.shape[1]} channels; allowed: {list(channels)}")
