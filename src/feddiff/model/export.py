"""Exported models: a diffusers pipeline folder, and the loader that also rebuilds pruned U-Nets.

``DDPMPipeline.save_pretrained`` writes the U-Net's config and weights. A pruned U-Net has non-uniform
widths that no ``UNet2DModel`` config can describe, so ``DDPMPipeline.from_pretrained`` cannot rebuild it
(the dense config meets smaller weights). Beside the dense config we write ``unet/feddiff_spec.json``: the
model spec (the config's arguments plus the pruning history). :func:`load_unet` replays it and loads the
weights; :func:`load_pipeline` wraps the result as ``DDPMPipeline(unet=..., scheduler=...)``. Unpruned
exports are plain diffusers folders that ``DDPMPipeline.from_pretrained`` loads as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from feddiff.model.spec import ModelSpec, SpecError, build_model

SPEC_FILE = "feddiff_spec.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def save_pipeline(model: UNet2DModel, spec: ModelSpec, scheduler, folder: str | Path) -> Path:
    """Save ``model`` and ``scheduler`` as a pipeline folder; a pruned model also gets its spec."""
    folder = Path(folder)
    DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    spec_path = folder / "unet" / SPEC_FILE
    if spec.history:
        spec_path.write_text(json.dumps(spec.to_json()))
    elif spec_path.exists():  # an older export in the same folder
        spec_path.unlink()
    return folder


def load_unet(folder: str | Path) -> UNet2DModel:
    """The U-Net of an exported ``unet/`` folder, pruned or not."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_path = folder / SPEC_FILE
    if not spec_path.exists():  # low_cpu_mem_usage=False: no "install accelerate" notice for small models
        return UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False)
    try:
        spec = ModelSpec.from_json(json.loads(spec_path.read_text()))
    except (json.JSONDecodeError, SpecError) as err:
        raise SpecError(f"{spec_path} is not a readable model spec: {err}") from None
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists():
        raise SpecError(f"{folder} has a model spec but no weights ({WEIGHTS_FILE})")
    model = build_model(spec, 0)
    state = load_file(str(weights_path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        missing = [k for k in model.state_dict() if k not in state]
        unexpected = [k for k in state if k not in model.state_dict()]
        raise SpecError(f"{weights_path} does not fit the architecture of {spec_path} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}): {str(err)[:200]}") from None
    model.eval()
    return model


def load_pipeline(folder: str | Path) -> DDPMPipeline:
    """An exported pipeline folder as a ``DDPMPipeline`` (pruned U-Nets included)."""
    folder = Path(folder)
    return DDPMPipeline(unet=load_unet(folder / "unet"), scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"))


__all__ = ["SPEC_FILE", "load_pipeline", "load_unet", "save_pipeline"]
