"""Personalised fine-tuning: each client adapts the final model on its own data; nothing is sent."""

import json

import numpy as np
import pytest
import torch

from feddiff.cli import main
from feddiff.config import ConfigError
from feddiff.engines.personalize import personalize
from feddiff.engines.runner import run
from feddiff.metrics.fid import FeatureStats, reweighted_stats
from feddiff.model.parts import group_of
from feddiff.types import under

EVAL = {"fid_num_samples": 12, "grid_size": 1, "num_inference_steps": 2}


def test_reweighted_stats_by_hand():
    feats, labels = np.array([[0.0], [2.0], [10.0]]), np.array([0, 0, 1])
    only0 = reweighted_stats(feats, labels, [1.0, 0.0])  # weights 1.5, 1.5, 0
    assert (only0.n, only0.sum[0], only0.outer[0, 0]) == (3.0, 3.0, 6.0)
    half = reweighted_stats(feats, labels, [0.5, 0.5])  # weights 0.75, 0.75, 1.5
    assert (half.n, half.sum[0], half.outer[0, 0]) == (3.0, 16.5, 0.75 * 4 + 1.5 * 100)
    # the split's own label shares give the split's own statistics
    x, y = np.random.default_rng(0).normal(size=(50, 3)), np.arange(50) % 4
    a, b = reweighted_stats(x, y, np.bincount(y) / 50), FeatureStats.from_features(x)
    assert a.n == pytest.approx(b.n) and np.allclose(a.sum, b.sum) and np.allclose(a.outer, b.outer)
    with pytest.raises(ValueError, match=r"classes \[2\] have weight"):
        reweighted_stats(feats, labels, [0.5, 0.0, 0.5])


def final_global(rd):
    return under(rd.latest_checkpoint()[1], "strategy/global/")


@pytest.mark.filterwarnings("ignore:pathological")
def test_a_run_ends_with_fine_tuning_on_each_clients_data_and_sends_nothing(make_config):
    from diffusers import UNet2DModel

    cfg = make_config(eval=EVAL, personalize={"steps": 3, "groups": ["decoder"]},
                      partition={"method": "pathological", "classes_per_client": 2})
    rd = run(cfg)
    rec = json.loads((rd.path / "personalize.json").read_text())
    assert rec["bytes"] == {} and rec["bytes_total"] == 0 and rec["steps"] == 3 and rec["groups"] == ["decoder"] and rec["start"] == "the global model"
    assert len(rd.read_metrics()) == 2  # no round was added, no message counted
    c0, c1 = rec["clients"]["client0"], rec["clients"]["client1"]
    # the global model is sampled once: the same FD against the global reference for every client, and an own
    # FD that differs with the clients' classes
    assert c0["before"]["fd"] == c1["before"]["fd"] == rd.read_metrics()[-1]["eval"]["fd"]
    assert c0["before"]["fd_own"] != c1["before"]["fd_own"]
    assert all(k in c0["after"] for k in ("fd", "fd_own", "heldout_loss", "train_loss", "grid"))
    fd_own = [c["after"]["fd_own"] for c in (c0, c1)]
    assert rec["summary"]["after"]["fd_own_mean"] == pytest.approx(sum(fd_own) / 2)
    assert rec["summary"]["after"]["fd_own_max"] == max(fd_own)
    # only the decoder moved: every other parameter is the global model's, bit for bit
    g = final_global(rd)
    tuned = UNet2DModel.from_pretrained(rd.path / "personalized" / "client0" / "unet").state_dict()
    moved = {group_of(k) for k in g if not torch.equal(g[k], tuned[k])}
    assert moved == {"decoder"}
    # the working model is trainable again afterwards, and the phase is deterministic
    from feddiff.engines.personalize import personalize as again

    assert all(p.requires_grad for p in UNet2DModel.from_pretrained(rd.path / "model" / "unet").parameters())
    rec2 = again(rd.path, log=lambda m: None)
    assert rec2["clients"] == rec["clients"]


def test_feddiff_personalize_on_a_finished_udec_run(make_config, capsys):
    rd = run(make_config(eval=EVAL, algorithm={"name": "udec"}))
    assert main(["personalize", str(rd.path), "--steps", "2", "--clients", "1"]) == 0
    out = capsys.readouterr().out
    assert "client1" in out and "0 bytes sent" in out
    rec = json.loads((rd.path / "personalize.json").read_text())
    assert rec["start"] == "personal models" and list(rec["clients"]) == ["client1"]
    # UDEC's personal model of client 1 is where it starts: its before is that model's own evaluation
    ev = rd.read_metrics()[-1]["eval"]["models"]["client1"]
    assert rec["clients"]["client1"]["before"]["fd"] == pytest.approx(ev["fd"])
    assert main(["personalize", str(rd.path), "--steps", "2", "--groups", "middle"]) == 2
    assert "unknown parameter groups ['middle']" in capsys.readouterr().err
    before = (rd.path / "personalize.json").read_bytes()
    for bad in ("", "1,1", "a"):
        assert main(["personalize", str(rd.path), "--steps", "2", "--clients", bad]) == 2
        assert "--clients must" in capsys.readouterr().err
    assert (rd.path / "personalize.json").read_bytes() == before  # nothing written over
    with pytest.raises(ConfigError, match="clients \\[7\\] do not exist"):
        personalize(rd.path, ["personalize.steps=1"], clients=[7])


def test_flower_refuses_the_phase(make_config):
    pytest.importorskip("flwr")
    from feddiff.engines.flower.apps import check_flower_config

    with pytest.raises(ConfigError, match="personalize.steps > 0 on Flower"):
        check_flower_config(make_config(personalize={"steps": 2}))


def test_the_report_shows_global_vs_personalised(make_config, tmp_path):
    from feddiff.report.document import build_report

    rd = run(make_config(eval=EVAL, personalize={"steps": 2}))
    rec = json.loads((rd.path / "personalize.json").read_text())
    report = build_report([rd.path], tmp_path / "report")
    text = report.markdown.read_text()
    assert "Global vs personalised" in text
    after = rec["summary"]["after"]
    assert f"{after['fd_own_mean']:.2f} ± {after['fd_own_std']:.2f}" in text
    assert sum("personalized-client" in p.name for p in (tmp_path / "report" / "grids").iterdir()) == 2
    html = report.html.read_text()
    assert "Global vs personalised" in html and html.count("(personalised) (client") == 4  # alt and caption of each grid


def test_a_run_killed_during_the_phase_resumes_only_the_phase_and_a_stale_record_is_marked(make_config, tmp_path):
    from feddiff.engines.runner import resume
    from feddiff.report.document import build_report

    rd = run(make_config(personalize={"steps": 2}))
    (rd.path / "personalize.json").unlink()  # as if killed during the phase
    lines = len(rd.read_metrics())
    resume(rd.path)
    assert (rd.path / "personalize.json").exists() and len(rd.read_metrics()) == lines  # no round trained again
    with pytest.raises(Exception, match="feddiff personalize"):  # nothing left to do: said plainly
        resume(rd.path)
    resume(rd.path, ["run.num_rounds=3", "personalize.steps=0"])  # trained on; the record is now of round 2
    text = build_report([rd.path], tmp_path / "report").markdown.read_text()
    assert "2 (stale: the run is at round 3)" in text


def test_personalize_settings_without_steps_are_refused(make_config):
    with pytest.raises(ConfigError, match="personalize.groups is set but personalize.steps = 0"):
        make_config(personalize={"groups": ["decoder"]})
