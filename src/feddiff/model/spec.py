"""The model spec: what a model's architecture is, as small JSON that tasks and checkpoints carry.

A spec is the ``UNet2DModel`` keyword arguments (from a preset and the config's overrides) plus the
structural history applied after building it (e.g. structured pruning steps). Everything that builds
a model, whether the client runtime, resume, evaluation, export or ``feddiff sample``, goes through
:func:`build_model`, so a model whose shape changes mid-run is rebuilt the same way everywhere.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffusers import UNet2DModel

from feddiff.model.presets import build_unet

# kind of structural step -> function(model, step) applying it in place; registered by the module
# that defines the step (structured pruning registers "prune"), so this module stays small
STRUCTURAL_STEPS: dict[str, Callable[[UNet2DModel, dict[str, Any]], None]] = {}
# kind -> module that registers it, imported on first use (the model layer does not import pruning eagerly)
PROVIDERS = {"prune": "feddiff.prune.structure"}


class SpecError(ValueError):
    """A model spec that cannot be read or rebuilt; the message names what is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    """A model's architecture: ``UNet2DModel(**unet)`` followed by ``history`` (structural steps)."""

    unet: dict[str, Any]
    history: tuple[dict[str, Any], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON-able data (lists for tuples)."""
        return json.loads(json.dumps({"unet": self.unet, "history": list(self.history)}))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        """Read what :meth:`to_json` wrote; tuples of the UNet kwargs come back as tuples."""
        if not isinstance(data, dict) or not isinstance(data.get("unet"), dict):
            raise SpecError(f"a model spec needs a 'unet' table of UNet2DModel arguments, got {data!r:.200}")
        unet = {k: tuple(v) if isinstance(v, list) else v for k, v in data["unet"].items()}
        history = data.get("history", [])
        if not isinstance(history, list) or not all(isinstance(s, dict) and "kind" in s for s in history):
            raise SpecError("a model spec's 'history' must be a list of steps, each with a 'kind'")
        return cls(unet, tuple(history))

    @property
    def id(self) -> str:
        """A short stable hash of the spec: equal ids, equal architectures."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_step(self, step: dict[str, Any]) -> ModelSpec:
        """This spec with one more structural step."""
        return ModelSpec(self.unet, (*self.history, step))


def build_model(spec: ModelSpec, seed: int = 0) -> UNet2DModel:
    """Build the model of ``spec``: the U-Net initialised from ``seed``, then every structural step.

    Weights after structural steps are whatever the steps leave; callers load the real weights.
    """
    model = build_unet(dict(spec.unet), seed)
    for step in spec.history:
        kind = step["kind"]
        if kind not in STRUCTURAL_STEPS and kind in PROVIDERS:
            importlib.import_module(PROVIDERS[kind])
        if kind not in STRUCTURAL_STEPS:
            raise SpecError(f"model spec step {kind!r} is unknown here; known: {sorted(STRUCTURAL_STEPS) or 'none'}")
        STRUCTURAL_STEPS[kind](model, step)
    return model
