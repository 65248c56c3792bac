"""Encoder / latent / decoder parameter groups of a ``UNet2DModel``, defined once.

Used by the U-Net partial-sharing schemes of de Goede et al. (USPLIT, UDEC, ULATDEC), by
``feddiff model-info`` and by reports. The grouping follows the authors' name predicates
(down = init conv, time MLP, downs; mid; up = ups, final conv), mapped onto diffusers' names.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

GROUPS = ("encoder", "latent", "decoder")

_TOP_LEVEL = {
    "conv_in": "encoder",
    "time_proj": "encoder",
    "time_embedding": "encoder",
    "class_embedding": "encoder",
    "down_blocks": "encoder",
    "mid_block": "latent",
    "up_blocks": "decoder",
    "conv_norm_out": "decoder",
    "conv_act": "decoder",
    "conv_out": "decoder",
}


def group_of(name: str) -> str:
    """The group of a state-dict key such as ``down_blocks.0.resnets.0.conv1.weight``."""
    top = name.split(".", 1)[0]
    if top not in _TOP_LEVEL:
        raise KeyError(f"parameter {name!r} is in no U-Net group; known top-level modules: {sorted(_TOP_LEVEL)}")
    return _TOP_LEVEL[top]


def check_groups(groups: Iterable[str]) -> list[str]:
    out = list(groups)
    bad = [g for g in out if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown parameter groups {bad}; choose from {list(GROUPS)}")
    return out


def select(state: dict[str, torch.Tensor], groups: Iterable[str]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that belong to ``groups``, in state order."""
    wanted = set(check_groups(groups))
    return {k: v for k, v in state.items() if group_of(k) in wanted}


def group_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of elements per group."""
    sizes = dict.fromkeys(GROUPS, 0)
    for k, v in state.items():
        sizes[group_of(k)] += v.numel()
    return sizes
