"""The leakage audit: near-copies by Carlini et al.'s criterion, loss-threshold membership inference."""

import json

import numpy as np
import pytest
import torch

from feddiff.cli import main
from feddiff.data.sources import write_idx
from feddiff.engines.audit import matched_heldout, run_audit
from feddiff.engines.experiment import build_experiment
from feddiff.engines.runner import run
from feddiff.engines.simulator import Simulator
from feddiff.metrics.leakage import membership_auc, near_copies, pixel_distances, tpr_at_fpr
from feddiff.runs import RunDir
from feddiff.types import under
from tests.conftest import tiny_config


def test_near_copies_by_hand():
    # generated 0 sits on training image 0 (distance 0.1) with neighbours at 1.0 and 1.0: 0.1 / (0.5 * 0.7) < 1;
    # generated 1 is equally far from all three: 1 / (0.5 * 1) = 2
    d = torch.tensor([[0.1, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    nc = near_copies(d, alpha=0.5, neighbours=50, threshold=1.0)
    assert nc.copied.tolist() == [True, False] and nc.nearest[0] == 0 and nc.fraction == 0.5
    assert nc.ratio[0].item() == pytest.approx(0.1 / (0.5 * 0.7)) and nc.ratio[1].item() == pytest.approx(2.0)
    # only the 2 nearest normalise: (0.1 + 1) / 2
    assert near_copies(d, neighbours=2).ratio[0].item() == pytest.approx(0.1 / (0.5 * 0.55))
    # every neighbour at distance 0 (a copy of duplicated images): ratio 0, a copy
    zero = near_copies(torch.zeros(1, 3, dtype=torch.float64))
    assert zero.ratio.item() == 0 and zero.copied.item() and zero.neighbours == 3
    with pytest.raises(ValueError, match="neighbours >= 2"):
        near_copies(d, neighbours=1)
    # the streaming nearest lists give the same verdicts as the whole matrix
    from feddiff.metrics.leakage import nearest

    g = torch.Generator().manual_seed(0)
    gen, train = torch.rand(5, 1, 4, 4, generator=g), torch.rand(37, 1, 4, 4, generator=g)
    dist, idx = nearest(gen, train, 10, chunk=8)
    whole = pixel_distances(gen, train)
    assert torch.allclose(dist, torch.sort(whole, dim=1).values[:, :10], rtol=0, atol=1e-12)
    streamed, at_once = near_copies(dist, neighbours=10, indices=idx), near_copies(whole, neighbours=10)
    assert torch.equal(streamed.nearest, at_once.nearest)
    assert torch.allclose(streamed.ratio, at_once.ratio, rtol=1e-12, atol=0)
    # RMS over pixels in [0, 1]: an image against its negative
    a = torch.zeros(1, 1, 2, 2)
    assert pixel_distances(a, torch.ones(1, 1, 2, 2)).item() == 1.0
    assert pixel_distances(a, torch.tensor([[[[1.0, 0], [0, 0]]]])).item() == pytest.approx(0.5)


def test_membership_auc_and_tpr_by_hand():
    members, held = torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.3, 0.4, 0.5, 0.8])
    # pairs where the member's loss is lower: 4 + 4 + 0 of 12
    assert membership_auc(members, held) == pytest.approx(8 / 12)
    assert membership_auc(held, held) == 0.5  # ties count half
    assert tpr_at_fpr(members, held, 0.01) == pytest.approx(2 / 3)  # below the lowest held-out loss
    # 200 held-out losses 1..200 at 1%: two may pass, so the threshold is the third smallest (3)
    many = torch.arange(1, 201, dtype=torch.float64)
    assert tpr_at_fpr(torch.tensor([2.5, 2.99, 3.0, 50.0]), many, 0.01) == 0.5
    with pytest.raises(ValueError, match="fpr must be in"):
        tpr_at_fpr(members, held, 1.0)
    labels, test = torch.tensor([3, 3, 5]), torch.tensor([5, 3, 1, 3, 3])
    idx = matched_heldout(labels, test, 0, "x")
    assert test[idx].tolist() == [3, 3, 5] and len(set(idx[:2].tolist())) == 2
    # more members of class 5 than test images of it: each is used once before any twice
    idx = matched_heldout(torch.tensor([5, 5, 5, 5]), torch.tensor([5, 1, 5]), 0, "y")
    assert sorted(idx.tolist()) == [0, 0, 2, 2]


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Distinct images with no class structure: random 4x4 block patterns, enlarged to 28x28."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.choice([0.0, 255.0], size=(n, 1, 4, 4)))
    return torch.nn.functional.interpolate(small, size=28, mode="nearest").to(torch.uint8)[:, 0].numpy()


def dataset(root, seed):
    root.mkdir()
    labels = np.arange(8, dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", smooth_images(8, seed))
    write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", smooth_images(8, seed + 100))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    return root


def handful_config(root, out, **audit):
    # 8 px, 4 images per client, 800 steps: the tiny U-Net reproduces its training images
    return tiny_config(root, out, run={"num_rounds": 8}, partition={"method": "iid"}, data={"image_size": 8},
                       train={"lr": 3e-3, "batch_size": 4, "local_steps": 100},
                       eval={"grid_size": 0, "loss_num_samples": 0, "num_inference_steps": 20},
                       audit={"num_samples": 32, "mia_num_images": 4, "features": False, **audit})


def test_a_model_overfitted_on_a_handful_of_images_is_flagged_and_one_that_never_saw_them_is_not(tmp_path):
    seen, unseen = dataset(tmp_path / "a", 0), dataset(tmp_path / "b", 1)
    overfit = run(handful_config(seen, tmp_path / "runs", enabled=True))
    rec = json.loads((overfit.path / "audit.json").read_text())
    assert rec["flagged"] == ["client0", "client1"] and rec["bytes"] == 0
    for r in rec["clients"].values():
        assert r["near_copies"] >= 2 and r["mia_auc"] >= 0.9
        assert (overfit.path / r["strip"]).is_file() and r["strip_ratios"][0] < 1
    # the same recipe on other images, audited against the first images: nothing of them comes out
    other = run(handful_config(unseen, tmp_path / "runs"))
    sim = Simulator(build_experiment(handful_config(seen, tmp_path / "runs")), RunDir.open(overfit.path))
    sim.restore()
    _, tensors, meta = other.latest_checkpoint()
    sim.exp.strategy.load_state_dict(under(tensors, "strategy/"), meta["strategy"])
    clean = run_audit(sim, 8, sim.cfg.audit, log=lambda m: None)
    assert clean["flagged"] == [] and all(r["near_copies"] == 0 for r in clean["clients"].values())
    assert min(r["ratio_min"] for r in clean["clients"].values()) > max(
        r["ratio_min"] for r in rec["clients"].values())


def test_feddiff_audit_measures_features_and_records_the_privacy_budget(make_config, capsys):
    rd = run(make_config(dp={"noise_multiplier": 0.5, "clip_norm": 1.0, "reproducible_noise": True}))
    assert main(["audit", str(rd.path), "--num-samples", "8", "--clients", "0"]) == 0
    out = capsys.readouterr().out
    assert "client0" in out and "near-copies" in out
    rec = json.loads((rd.path / "audit.json").read_text())
    r = rec["clients"]["client0"]
    assert list(rec["clients"]) == ["client0"]
    assert rec["dp"]["epsilon"] == rd.read_metrics()[-1]["dp"]["epsilon"] > 0  # the audited round's budget
    assert r["nn_feature_min"] > 0 and r["mia_members"] == min(256, r["train_images"])
    assert main(["audit", str(rd.path), "--set", "audit.mia_timesteps=[5000]"]) == 2
    assert "not below diffusion.num_train_timesteps" in capsys.readouterr().err


def test_the_report_sets_the_audit_beside_the_privacy_budget(make_config, tmp_path):
    from feddiff.report.document import build_report

    plain = run(make_config(run={"name": "plain"}, audit={"enabled": True, "num_samples": 8, "mia_num_images": 16}))
    private = run(make_config(run={"name": "private"}, dp={"noise_multiplier": 0.5, "clip_norm": 1.0},
                              audit={"enabled": True, "num_samples": 8, "mia_num_images": 16}))
    text = build_report([plain.path, private.path], tmp_path / "report").markdown.read_text()
    assert "Leakage audit" in text and "no DP" in text
    eps = json.loads((private.path / "audit.json").read_text())["dp"]["epsilon"]
    auc = json.loads((plain.path / "audit.json").read_text())["summary"]["mia_auc_mean"]
    assert f"{eps:.3g}" in text and f"{auc:.3f}" in text
    assert sum("closest-client" in p.name for p in (tmp_path / "report" / "grids").iterdir()) == 4


def test_personal_models_are_audited_against_the_other_clients_images_too(make_config, capsys):
    rd = run(make_config(algorithm={"name": "udec"}, data={"random_flip": True},
                         audit={"enabled": True, "num_samples": 8, "mia_num_images": 8, "features": False}))
    rec = json.loads((rd.path / "audit.json").read_text())
    assert rec["model"] == "personal models"
    assert rec["clients"]["client0"]["others"]["model"] == "client1"
    assert rec["clients"]["client1"]["others"]["model"] == "client0"
    before = (rd.path / "audit.json").read_bytes()
    assert main(["audit", str(rd.path), "--clients", ","]) == 2
    assert "must name each client once" in capsys.readouterr().err
    assert (rd.path / "audit.json").read_bytes() == before
