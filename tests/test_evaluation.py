"""FD / KID / IS wired into runs: protocol recorded, feddiff eval, federated reference statistics."""

import json

import pytest

from feddiff.cli import main
from feddiff.config import ConfigError
from feddiff.engines.runner import evaluate_checkpoint, resume, run

FID = {"fid_num_samples": 12, "grid_size": 1, "num_inference_steps": 2}


def test_run_records_fd_domain_with_protocol(make_config):
    rd = run(make_config(run={"num_rounds": 1}, eval=FID))
    ev = rd.read_metrics()[-1]["eval"]
    assert ev["label"] == "FD-domain"  # never plain "FID" for the domain network
    assert ev["fd"] > 0 and "kid_mean" in ev and ev["is_mean"] >= 1.0
    p = ev["protocol"]
    assert p["feature_net"] == "domain" and p["num_generated"] == 12 and p["reference"] == "test split"
    assert p["reference_size"] == 80 and p["sampler"] == "ddim" and p["steps"] == 2
    assert (p["kid_subset_size"], p["is_splits"]) == (12, 10) and p["kid_subsets"] >= 1  # capped by 12 samples
    assert rd.read_metrics()[-1]["time_s"]["eval"] > 0


def test_feddiff_eval_appends_and_is_reproducible(make_config, capsys):
    rd = run(make_config(run={"num_rounds": 1}))
    assert main(["eval", str(rd.path), "--num-samples", "10", "--steps", "2"]) == 0
    assert "FD-domain" in capsys.readouterr().out
    a = json.loads((rd.path / "evals.jsonl").read_text().splitlines()[0])
    b = evaluate_checkpoint(rd.path, 1, ["eval.fid_num_samples=10", "eval.num_inference_steps=2"])
    assert a["round"] == 1 and a["eval"]["fd"] == pytest.approx(b["eval"]["fd"], rel=1e-9)
    assert len((rd.path / "evals.jsonl").read_text().splitlines()) == 2
    with pytest.raises(Exception, match="no checkpoint of round 7"):
        evaluate_checkpoint(rd.path, 7, [])
    with pytest.raises(ConfigError, match="eval.\\* settings only"):
        evaluate_checkpoint(rd.path, None, ["train.lr=1"])


def test_federated_reference_equals_pooled(make_config):
    """Clients send feature sums of their own images; the FD equals the one from the pooled images."""
    common = dict(run={"num_rounds": 1}, data={"max_train_samples": 0})
    pooled = run(make_config(eval={**FID, "reference_split": "train"}, **common))
    fed = run(make_config(eval={**FID, "federated_reference": True}, **common))
    e_p, e_f = pooled.read_metrics()[-1]["eval"], fed.read_metrics()[-1]["eval"]
    assert e_f["fd"] == pytest.approx(e_p["fd"], rel=1e-6)
    assert "kid_mean" not in e_f  # KID needs the features themselves
    first = fed.read_metrics()[0]
    # the feature sums are setup traffic on the eval link, before round 1, not part of round 1's bytes
    assert first["bytes_setup"]["eval"]["up"] > 0 and "eval" not in first["bytes"]
    assert "bytes_setup" not in pooled.read_metrics()[0] and "eval" not in pooled.read_metrics()[0]["bytes"]
    assert first["bytes_cumulative"]["eval"] == first["bytes_setup"]["eval"]
    # the clients' rows count the round's own messages, not the feature sums on the eval link
    assert sum(c["bytes_up"] for c in first["clients"]) == first["bytes"]["client-server"]["up"]


def test_personal_models_report_mean_and_spread(make_config):
    rd = run(make_config(run={"num_rounds": 1}, algorithm={"name": "ulatdec"}, eval=FID))
    ev = rd.read_metrics()[-1]["eval"]
    fds = [ev["models"][c]["fd"] for c in ("client0", "client1")]
    assert ev["fd_mean"] == pytest.approx(sum(fds) / 2) and ev["fd_std"] >= 0 and ev["label"] == "FD-domain"


def test_inception_without_weights_is_a_clear_error(make_config, monkeypatch):
    monkeypatch.delenv("FEDDIFF_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05-6726825d.pth"):
        run(make_config(run={"num_rounds": 1}, eval={**FID, "feature_net": "inception"}))


def test_federated_reference_is_exact_under_a_lossy_uplink_and_not_asked_again_on_resume(make_config):
    # feature sums are statistics, not model updates: the uplink codec must not touch them
    common = dict(data={"max_train_samples": 0}, compress={"uplink": {"codec": "fp16"}})
    pooled = run(make_config(run={"num_rounds": 1}, eval={**FID, "reference_split": "train"}, **common))
    fed = run(make_config(run={"num_rounds": 1}, eval={**FID, "federated_reference": True}, **common))
    assert fed.read_metrics()[-1]["eval"]["fd"] == pytest.approx(pooled.read_metrics()[-1]["eval"]["fd"], rel=1e-6)
    full = run(make_config(run={"num_rounds": 2}, eval={**FID, "federated_reference": True}, **common))
    resume(fed.path, ["run.num_rounds=2"])
    assert fed.read_metrics()[-1]["bytes_cumulative"] == full.read_metrics()[-1]["bytes_cumulative"]
