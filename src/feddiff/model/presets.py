"""Named ``diffusers.UNet2DModel`` configurations, and the one function that builds a model.

A preset is a plain dict of UNet2DModel arguments. ``levels`` lists channels per resolution level
(level 0 = full resolution) and ``attention`` the levels with self-attention; the mid block always
has attention (UNet2DModel's default), which is cheap at the lowest resolution.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel

# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    # for tests: ~0.2M parameters, 8-16 px
    "tiny": dict(levels=(16, 32), layers_per_block=1, norm_num_groups=8, attention=()),
    # quickstart: ~1.1M parameters, fast on 2 CPU cores at 28-32 px
    "small": dict(levels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, attention=()),
    # ~3.2M parameters for 28-32 px gray images, near the size of de Goede et al.'s FMNIST U-Net (3.0M)
    "fmnist": dict(levels=(32, 64, 112), layers_per_block=2, norm_num_groups=8, attention=(2,)),
    # the DDPM CIFAR-10 network (Ho et al. 2020; google/ddpm-cifar10-32; FedPhD's model): 35.7M
    "cifar10-ddpm": dict(levels=(128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
                         attention=(1,), dropout=0.1),
}
# fmt: on


def unet_kwargs(
    preset: str,
    in_channels: int,
    image_size: int,
    *,
    block_out_channels: list[int] | None = None,
    layers_per_block: int | None = None,
    norm_num_groups: int | None = None,
    attention_levels: list[int] | None = None,
    dropout: float | None = None,
) -> dict[str, Any]:
    """UNet2DModel keyword arguments for a preset with optional overrides, validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    levels = tuple(block_out_channels or p["levels"])
    attention = set(p["attention"] if attention_levels is None else attention_levels)
    groups = norm_num_groups or p["norm_num_groups"]
    bad = [c for c in levels if c % groups]
    if bad:
        raise ValueError(f"model: channels {bad} are not divisible by norm_num_groups={groups}")
    if not attention <= set(range(len(levels))):
        raise ValueError(f"model.attention_levels {sorted(attention)} must be within 0..{len(levels) - 1}")
    factor = 2 ** (len(levels) - 1)
    if image_size % factor:
        raise ValueError(
            f"data.image_size={image_size} is not divisible by {factor}, which the {len(levels)}-level "
            f"U-Net needs; use e.g. {image_size + factor - image_size % factor} (data.resize='pad')"
        )
    down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(levels)))
    up = tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(len(levels))))
    return dict(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=levels,
        layers_per_block=layers_per_block or p["layers_per_block"],
        norm_num_groups=groups,
        down_block_types=down,
        up_block_types=up,
        dropout=p.get("dropout", 0.0) if dropout is None else dropout,
        attention_head_dim=8,
    )


def build_unet(kwargs: dict[str, Any], seed: int) -> UNet2DModel:
    """Build a UNet2DModel on the CPU with weights initialised from ``seed``.

    Parameters
    ----------
    kwargs : dict
        UNet2DModel keyword arguments, e.g. from ``unet_kwargs``.
    seed : int
        Seed of the CPU generator the initial weights are drawn from.

    Returns
    -------
    UNet2DModel
        The model, on the CPU. Its weights equal those drawn after ``torch.manual_seed(seed)``.
        Only the CPU generator is seeded (``torch.manual_seed`` would also reseed every CUDA
        device), and its state is restored afterwards: no global RNG changes.
    """
    with torch.random.fork_rng(devices=[], device_type="cuda"):
        torch.default_generator.manual_seed(int(seed))
        return UNet2DModel(**kwargs)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
