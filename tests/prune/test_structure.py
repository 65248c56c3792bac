"""Structured pruning: hand-computed widths, exact replay on another copy, index maps, Taylor, exports."""

import json

import pytest
import torch
from diffusers import DDPMPipeline
from diffusers.models.attention_processor import Attention

from feddiff.model.diffusion import make_scheduler
from feddiff.model.export import SPEC_FILE, load_pipeline, load_unet, save_pipeline
from feddiff.model.presets import unet_kwargs
from feddiff.model.spec import ModelSpec, SpecError, build_model
from feddiff.prune.structure import index_maps, prune_model, restructure, to_spec


def spec_of(levels=(32, 64), attention=(1,)):
    return ModelSpec(unet_kwargs("tiny", 1, 8, block_out_channels=list(levels), norm_num_groups=8,
                                 attention_levels=list(attention)))


def widths(model):
    return [b.resnets[0].conv1.out_channels for b in model.down_blocks]


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 8, 8, generator=g)
    model.eval()
    with torch.no_grad():
        return model(x, torch.tensor([1, 400, 999])).sample


@pytest.mark.parametrize("ratio, expected", [
    # 8 GroupNorm groups: channels are pruned alike in every group, kept per group = int(size * (1 - ratio))
    (0.25, [24, 48]),  # group sizes 4 and 8: 3 and 6 kept
    (0.3, [16, 40]),   # int(4 * 0.7) = 2 (half of the first level), int(8 * 0.7) = 5
    (0.5, [16, 32]),
])
def test_widths_step_with_the_groupnorm_groups(ratio, expected):
    model = build_model(spec_of(), 0)
    prune_model(model, ratio)
    assert widths(model) == expected
    assert model.conv_out.out_channels == 1 and model.conv_out.in_channels == expected[0]  # outputs kept
    assert outputs(model).shape == (3, 1, 8, 8)


def test_attention_keeps_its_heads_and_prunes_each_head_alike():
    model = build_model(spec_of(), 0)
    heads = [m.heads for m in model.modules() if isinstance(m, Attention)]
    prune_model(model, 0.25)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    # one attention in the down block, one in the mid block, two in the up block; 64 channels / head dim 8
    assert [m.heads for m in attn] == heads == [8, 8, 8, 8]
    for m in attn:  # 64 -> 48 channels; q/k/v 64 -> 48 = 8 heads x 6
        assert m.to_q.weight.shape == (48, 48) and m.inner_dim == 48 and m.scale == pytest.approx(6 ** -0.5)


def test_a_client_replaying_the_history_has_the_servers_model_exactly():
    spec = spec_of()
    server = build_model(spec, 0)
    dense = {k: v.clone() for k, v in server.state_dict().items()}
    step = prune_model(server, 0.3)
    json.dumps(step)  # travels as JSON
    client = build_model(spec.with_step(step), seed=7)  # another copy, other initial weights
    client.load_state_dict(restructure(dense, index_maps(spec, spec.with_step(step))))
    assert all(torch.equal(a, b) for a, b in zip(server.state_dict().values(), client.state_dict().values()))
    assert torch.equal(outputs(server), outputs(client))


def test_restructure_prunes_every_tensor_named_like_a_parameter_and_nothing_else():
    spec = spec_of(attention=())
    model = build_model(spec, 0)
    step = prune_model(model, 0.5)
    new = spec.with_step(step)
    maps = index_maps(spec, new)
    w = build_model(spec, 0).state_dict()["conv_in.weight"]  # (32, 1, 3, 3) -> (16, 1, 3, 3)
    kept = maps["conv_in.weight"][1][0]
    got = restructure({"global/conv_in.weight": w, "conv_in.weight/exp_avg": 2 * w, "ef/conv_in.weight": w[:16],
                       "conv_in.weight/step": torch.ones(1), "info/0/label_histogram": torch.arange(32)}, maps)
    assert torch.equal(got["global/conv_in.weight"], w[kept]) and torch.equal(got["conv_in.weight/exp_avg"], 2 * w[kept])
    assert torch.equal(got["ef/conv_in.weight"], w[:16])  # already of the new shape: kept as it is
    assert torch.equal(got["conv_in.weight/step"], torch.ones(1))
    assert torch.equal(got["info/0/label_histogram"], torch.arange(32))
    assert kept.tolist() == sorted(kept.tolist()) and len(set(kept.tolist())) == 16
    assert to_spec({"a": w}, spec, spec) == {"a": w}
    with pytest.raises(SpecError, match="does not extend"):
        index_maps(new, spec_of(levels=(16, 32)).with_step(step))


def test_taylor_importance_keeps_the_channels_the_update_moved():
    spec = spec_of(attention=())
    for favoured in (3, 28):
        model = build_model(spec, 0)
        grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        grads["conv_in.weight"][favoured] = 1.0  # only one level-0 channel has a gradient
        step = prune_model(model, 0.5, "taylor", grads)
        kept = index_maps(spec, spec.with_step(step))["conv_in.weight"][1][0].tolist()
        assert favoured in kept and step["importance"] == "taylor"
    with pytest.raises(ValueError, match="gradients"):
        prune_model(build_model(spec, 0), 0.5, "taylor")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        prune_model(build_model(spec, 0), 1.0)
    with pytest.raises(ValueError, match="choose from"):
        prune_model(build_model(spec, 0), 0.5, "random")


def test_a_history_naming_other_modules_is_refused():
    spec = spec_of().with_step({"kind": "prune", "history": [["down_blocks.7.conv", True, [0]]]})
    with pytest.raises(SpecError, match="down_blocks.7.conv"):
        build_model(spec)


def test_a_pruned_export_loads_and_samples(tmp_path):
    spec = spec_of()
    model = build_model(spec, 0)
    step = prune_model(model, 0.3)
    sched = make_scheduler(1000, "linear", 1e-4, 0.02)
    save_pipeline(model, spec.with_step(step), sched, tmp_path / "m")
    assert (tmp_path / "m" / "unet" / SPEC_FILE).exists()
    again = load_unet(tmp_path / "m" / "unet")
    assert torch.equal(outputs(model), outputs(again))
    pipe = load_pipeline(tmp_path / "m")
    assert isinstance(pipe, DDPMPipeline)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1)
    # an unpruned export is a plain diffusers folder (no spec file, even over an old pruned export)
    save_pipeline(build_model(spec, 0), spec, sched, tmp_path / "m")
    assert not (tmp_path / "m" / "unet" / SPEC_FILE).exists()
    assert DDPMPipeline.from_pretrained(tmp_path / "m").unet.conv_in.out_channels == 32
    (tmp_path / "m" / "unet" / SPEC_FILE).write_text(json.dumps(spec.with_step(step).to_json()))
    with pytest.raises(SpecError, match="does not fit"):
        load_unet(tmp_path / "m" / "unet")


def test_a_ratio_that_would_empty_a_group_leaves_that_level_whole_and_says_so():
    model = build_model(spec_of(), 0)  # groups of 4 and 8 channels
    with pytest.warns(UserWarning, match=r"level\(s\) \[0\] at full width \(\[32, 64\] -> \[32, 8\]\)"):
        prune_model(model, 0.8)  # int(4 * 0.2) = 0 kept: refused; int(8 * 0.2) = 1 kept of each group of 8
    assert widths(model) == [32, 8]
