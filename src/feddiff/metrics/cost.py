"""Model cost: parameters and multiply-accumulates (MACs) of a U-Net at a given resolution.

MACs come from Torch-Pruning's maintained counter (``tp.utils.count_ops_and_params``), the one
the FedPhD and Diff-Pruning numbers were measured with: for the DDPM CIFAR-10 U-Net it gives
35.75M parameters and 6.06 GMACs at 32x32.
"""

from __future__ import annotations

import contextlib
import io

import torch

from feddiff.model.parts import GROUPS, group_sizes


def count_params_macs(model: torch.nn.Module, in_channels: int, image_size: int) -> tuple[int, int]:
    """(parameters, MACs) of one forward pass on a single (1, C, H, W) image."""
    import torch_pruning as tp

    device = next(model.parameters()).device
    example = {"sample": torch.zeros(1, in_channels, image_size, image_size, device=device),
               "timestep": torch.ones(1, dtype=torch.long, device=device)}
    was_training = model.training
    model.eval()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the counter prints a batch-size note
        macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(params), int(macs)


def model_cost(model: torch.nn.Module, in_channels: int, image_size: int) -> dict:
    """Parameters, MACs and the encoder/latent/decoder split, as recorded in runs and reports."""
    params, macs = count_params_macs(model, in_channels, image_size)
    sizes = group_sizes(dict(model.named_parameters()))
    return {
        "parameters": params,
        "macs": macs,
        "image_size": image_size,
        "groups": {g: {"parameters": sizes[g], "share": sizes[g] / params} for g in GROUPS},
    }


def architecture_signature(state: dict[str, torch.Tensor]) -> str:
    """Changes exactly when the architecture (tensor names or shapes) changes, e.g. after pruning."""
    return ";".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
