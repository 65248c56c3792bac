from feddiff.cli import main
from feddiff.metrics.cost import architecture_signature, count_params_macs, model_cost
from feddiff.model.presets import build_unet, unet_kwargs


def test_cifar10_ddpm_params_and_macs():
    # DDPM CIFAR-10 network: 35.75M parameters, 6.06 GMACs at 32x32 (FedPhD, Diff-Pruning)
    params, macs = count_params_macs(build_unet(unet_kwargs("cifar10-ddpm", 3, 32), 0), 3, 32)
    assert params == 35_746_307
    assert abs(macs / 1e9 - 6.06) < 0.01


def test_model_cost_groups_and_signature():
    m = build_unet(unet_kwargs("tiny", 1, 16), 0)
    c = model_cost(m, 1, 16)
    assert sum(g["parameters"] for g in c["groups"].values()) == c["parameters"]
    assert abs(sum(g["share"] for g in c["groups"].values()) - 1) < 1e-9
    sig = architecture_signature(m.state_dict())
    smaller = {k: v[:1] if k == "conv_in.weight" else v for k, v in m.state_dict().items()}
    assert architecture_signature(smaller) != sig


def test_model_info_cli(capsys):
    assert main(["model-info", "small", "--image-size", "28"]) == 0
    out = capsys.readouterr().out
    assert "1,062,497" in out and "decoder" in out and "%" in out
    assert main(["model-info", "cifar10-ddpm", "--image-size", "30"]) == 2
    assert "not divisible by 8" in capsys.readouterr().err
