"""Image transforms in plain torch (no torchvision): fit to size, scale to [-1, 1], flips, grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def fit_to_size(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Bring uint8 images (N, C, H, W) to (N, C, size, size), once, at load time.

    ``pad`` centres the image on a black canvas (Fashion-MNIST 28 -> 32 keeps every pixel);
    ``resize`` is bilinear with antialiasing; ``center-crop`` takes the central square, then resizes.
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if mode == "pad":
        if h > size or w > size:
            raise ValueError(
                f"data.resize='pad' cannot shrink {h}x{w} images to {size}; use 'resize' or 'center-crop'"
            )
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top), value=0)
    if mode == "center-crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[:, :, top : top + side, left : left + side]
    elif mode != "resize":
        raise ValueError(f"unknown resize mode {mode!r}; choose from ['center-crop', 'pad', 'resize']")
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, 4096):  # chunks bound the float copy's memory
        chunk = images[start : start + 4096].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 4096] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32).div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped and rounded."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2, drawing from ``generator``."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile uint8 images (N, C, H, W) into one (C, H', W') image with ``pad`` black pixels between."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """Save a uint8 (C, H, W) image as PNG, optionally enlarged ``scale`` times (nearest)."""
    from PIL import Image

    arr = image.cpu()
    if scale > 1:
        arr = arr.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    arr = arr.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)  # uint8: L or RGB
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path
