"""Model specs: JSON round trip, stable ids, one builder, unknown structural steps named."""

import pytest
import torch

from feddiff.model.presets import build_unet, unet_kwargs
from feddiff.model.spec import STRUCTURAL_STEPS, ModelSpec, SpecError, build_model


def test_spec_round_trips_and_builds_the_preset_model():
    spec = ModelSpec(unet_kwargs("tiny", 1, 8))
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.id == spec.id
    a, b = build_model(spec, 5).state_dict(), build_unet(unet_kwargs("tiny", 1, 8), 5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert spec.with_step({"kind": "x"}).id != spec.id


def test_structural_steps_replay_and_unknown_ones_are_named(monkeypatch):
    spec = ModelSpec(unet_kwargs("tiny", 1, 8)).with_step({"kind": "zero-out", "module": "conv_out"})
    with pytest.raises(SpecError, match="'zero-out' is unknown"):
        build_model(spec)
    monkeypatch.setitem(STRUCTURAL_STEPS, "zero-out",
                        lambda model, step: torch.nn.init.zeros_(getattr(model, step["module"]).weight))
    assert build_model(spec).conv_out.weight.abs().sum() == 0
    with pytest.raises(SpecError, match="unet"):
        ModelSpec.from_json({"history": []})
