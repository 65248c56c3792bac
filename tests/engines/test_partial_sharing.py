"""USPLIT / UDEC / ULATDEC through the simulator: personal models, real bytes, savings vs group sizes."""

import pytest
import torch

from feddiff.engines.runner import run
from feddiff.model.parts import group_sizes
from feddiff.model.presets import build_unet, unet_kwargs

ROUNDS = 3


def shares() -> dict[str, float]:
    sizes = group_sizes(build_unet(unet_kwargs("tiny", 1, 16), 0).state_dict())
    total = sum(sizes.values())
    return {g: n / total for g, n in sizes.items()}


def test_udec_evaluates_and_exports_each_client(make_config):
    from diffusers import DDPMPipeline

    rd = run(make_config(algorithm={"name": "udec"}, eval={"every_rounds": 1}))
    ev = rd.read_metrics()[-1]["eval"]
    assert set(ev["models"]) == {"client0", "client1"}
    losses = [ev["models"][c]["heldout_loss"] for c in ("client0", "client1")]
    assert ev["heldout_loss_mean"] == pytest.approx(sum(losses) / 2)
    assert ev["heldout_loss_std"] == pytest.approx(float(torch.tensor(losses, dtype=torch.float64).std()))
    assert (rd.path / "samples" / "final-client1.png").is_file()
    pipe = DDPMPipeline.from_pretrained(rd.path / "models" / "client0")
    assert pipe.unet.config.sample_size == 16
    assert not (rd.path / "model").exists()  # the "global" model of UDEC has untrained encoders

    from feddiff.cli import main

    out = rd.path / "c1.png"
    assert main(["sample", str(rd.path), "--num", "2", "--steps", "1", "--client", "1", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["sample", str(rd.path), "--num", "2", "--out", str(out)]) == 2  # which client? must be said


def test_personal_models_share_only_the_decoder(make_config):
    rd = run(make_config(algorithm={"name": "udec"}, run={"num_rounds": 2}))
    _, tensors, _ = rd.latest_checkpoint()
    p0 = {k.removeprefix("client/0/personal/"): v for k, v in tensors.items() if k.startswith("client/0/personal/")}
    p1 = {k.removeprefix("client/1/personal/"): v for k, v in tensors.items() if k.startswith("client/1/personal/")}
    enc = "down_blocks.0.resnets.0.conv1.weight"
    assert not torch.equal(p0[enc], p1[enc])  # private encoders diverge
    dec = "up_blocks.0.resnets.0.conv1.weight"
    g = {k.removeprefix("strategy/global/"): v for k, v in tensors.items() if k.startswith("strategy/global/")}
    # the server's decoder is the average of the two uploads of the last round
    assert not torch.equal(g[dec], p0[dec]) and not torch.equal(g[dec], p1[dec])


@pytest.mark.parametrize("name,predicted", [
    # per client over R rounds, relative to FULL's 2R model-sized messages:
    ("udec", lambda s: 1 - (1 + (ROUNDS - 1) * s["decoder"] + ROUNDS * s["decoder"]) / (2 * ROUNDS)),
    ("ulatdec", lambda s: 1 - (1 + (2 * ROUNDS - 1) * (s["decoder"] + s["latent"])) / (2 * ROUNDS)),
    ("usplit", lambda s: 0.25),  # 2 clients: full downloads, the pair uploads one model between them
])
def test_cumulative_savings_match_group_sizes(make_config, name, predicted):
    full = run(make_config(run={"num_rounds": ROUNDS}))
    part = run(make_config(run={"num_rounds": ROUNDS}, algorithm={"name": name}))
    b_full = full.read_metrics()[-1]["bytes_total_cumulative"]
    b_part = part.read_metrics()[-1]["bytes_total_cumulative"]
    measured = 1 - b_part / b_full
    # headers (tensor names, shapes) are the only difference from the parameter arithmetic
    assert measured == pytest.approx(predicted(shares()), abs=0.015), (measured, predicted(shares()))
    if name != "usplit":  # the full model goes down once, at each client's first round, then the shared part
        first, later = part.read_metrics()[0]["clients"], part.read_metrics()[1]["clients"]
        s = shares()
        share = s["decoder"] + (s["latent"] if name == "ulatdec" else 0)
        assert all(b["bytes_down"] / a["bytes_down"] == pytest.approx(share, abs=0.02) for a, b in zip(first, later))
