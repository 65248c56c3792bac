import pytest
import torch

from feddiff.model.parts import GROUPS, group_of, group_sizes, select
from feddiff.model.presets import PRESETS, build_unet, count_parameters, unet_kwargs


def test_cifar10_ddpm_is_the_ddpm_network():
    m = build_unet(unet_kwargs("cifar10-ddpm", 3, 32), 0)
    assert count_parameters(m) == 35_746_307  # Ho et al. / google/ddpm-cifar10-32


def test_tiny_is_tiny_and_runs():
    m = build_unet(unet_kwargs("tiny", 1, 16), 0)
    assert count_parameters(m) < 1_000_000
    out = m(torch.zeros(2, 1, 16, 16), torch.tensor([1, 500])).sample
    assert out.shape == (2, 1, 16, 16)


def test_same_seed_same_weights():
    a = build_unet(unet_kwargs("tiny", 1, 8), 5).state_dict()
    b = build_unet(unet_kwargs("tiny", 1, 8), 5).state_dict()
    c = build_unet(unet_kwargs("tiny", 1, 8), 6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_sizes_are_clear():
    with pytest.raises(ValueError, match=r"image_size=28 is not divisible by 8.*use e.g. 32"):
        unet_kwargs("cifar10-ddpm", 3, 28)
    with pytest.raises(ValueError, match=r"channels \[12\] are not divisible by norm_num_groups=8"):
        unet_kwargs("tiny", 1, 16, block_out_channels=[16, 12])
    with pytest.raises(ValueError, match="unknown model preset 'x'"):
        unet_kwargs("x", 1, 16)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_groups_partition_every_tensor(preset):
    size = 32
    m = build_unet(unet_kwargs(preset, 3 if preset == "cifar10-ddpm" else 1, size), 0)
    state = m.state_dict()
    parts = [select(state, [g]) for g in GROUPS]
    assert sum(len(p) for p in parts) == len(state)
    assert set().union(*map(set, parts)) == set(state)
    sizes = group_sizes(state)
    assert sum(sizes.values()) == count_parameters(m) and all(v > 0 for v in sizes.values())


def test_group_of_names():
    assert group_of("conv_in.weight") == "encoder"
    assert group_of("time_embedding.linear_1.bias") == "encoder"
    assert group_of("mid_block.attentions.0.to_q.weight") == "latent"
    assert group_of("up_blocks.0.resnets.0.conv1.weight") == "decoder"
    assert group_of("conv_out.bias") == "decoder"
    with pytest.raises(KeyError, match="in no U-Net group"):
        group_of("lora.weight")
