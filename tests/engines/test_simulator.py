"""End-to-end runs of the tiny model: run folder contents, determinism, resume equivalence."""

import json

import pytest
import torch

from feddiff.engines.runner import resume, run
from feddiff.runs import RunDir, RunError


def final_weights(run_dir: RunDir) -> dict[str, torch.Tensor]:
    _, tensors, _ = run_dir.latest_checkpoint()
    return {k: v for k, v in tensors.items() if k.startswith("strategy/global/")}


def test_run_folder_contents(make_config):
    rd = run(make_config(eval={"every_rounds": 1}))
    files = {p.relative_to(rd.path).as_posix() for p in rd.path.rglob("*") if p.is_file()}
    for f in ("config.json", "manifest.json", "partition.json", "metrics.jsonl", "samples/round-0001.png",
              "samples/round-0002.png", "samples/final.png", "checkpoints/round-00002.safetensors",
              "model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
              "model/scheduler/scheduler_config.json"):
        assert f in files, f
    metrics = rd.read_metrics()
    assert [m["round"] for m in metrics] == [1, 2]
    m = metrics[0]
    assert {c["id"] for c in m["clients"]} == {0, 1}
    assert all(c["bytes_down"] > 0 and c["bytes_up"] > 0 and c["steps"] == 2 for c in m["clients"])
    assert m["bytes"]["client-server"]["down"] == sum(c["bytes_down"] for c in m["clients"])
    assert metrics[1]["bytes_cumulative"]["client-server"]["up"] == sum(
        c["bytes_up"] for r in metrics for c in r["clients"])
    assert set(m["time_s"]) == {"train", "aggregate", "eval", "round"}
    assert "heldout_loss" in m["eval"] and "heldout_loss" in metrics[1]["eval"]
    side = json.loads((rd.path / "checkpoints" / "round-00002.json").read_text())
    assert side["round"] == 2 and side["clients"]["0"]["steps_done"] == 4 and "ledger" in side
    part = json.loads((rd.path / "partition.json").read_text())
    assert sum(part["sizes"]) == 400 and len(part["label_histograms"]) == 2 and part["unused_samples"] == 0
    assert json.loads((rd.path / "config.json").read_text())["run"]["seed"] == 3


def test_bytes_are_real_serialized_sizes(make_config):
    rd = run(make_config(run={"num_rounds": 1}))
    n_params = sum(v.numel() for v in final_weights(rd).values())
    c = rd.read_metrics()[0]["clients"][0]
    # fp32 weights plus a header that is a small fraction of them
    assert 4 * n_params < c["bytes_down"] < 4 * n_params * 1.05


def test_same_seed_same_run(make_config):
    # dropout draws from torch's global generator: each client round must seed it
    a = final_weights(run(make_config(model={"dropout": 0.1})))
    torch.manual_seed(12345)  # whatever the global state between runs
    b = final_weights(run(make_config(model={"dropout": 0.1})))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = final_weights(run(make_config(run={"seed": 4}, model={"dropout": 0.1})))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_extends_to_identical_weights(make_config):
    # keep Adam state and warm up, so the checkpoint must carry client state too
    train, model = {"keep_optimizer_state": True, "warmup_steps": 3}, {"dropout": 0.1}
    full = run(make_config(run={"num_rounds": 3}, train=train, model=model))
    part = run(make_config(run={"num_rounds": 1}, train=train, model=model))
    resumed = resume(part.path, ["run.num_rounds=3"])
    a, b = final_weights(full), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = full.read_metrics(), resumed.read_metrics()
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    assert ma[-1]["bytes_cumulative"] == mb[-1]["bytes_cumulative"]


def test_extending_a_cosine_run_keeps_its_schedule(make_config, capsys):
    # the rounds already trained keep their learning rates; the added ones train at lr * min_lr_ratio
    train = {"lr_schedule": "cosine", "min_lr_ratio": 0.25}
    part = run(make_config(run={"num_rounds": 2}, train=train))
    extended = resume(part.path, ["run.num_rounds=3"])
    assert "cosine lr schedule keeps its 2 rounds" in capsys.readouterr().out
    assert json.loads((extended.path / "config.json").read_text())["train"]["lr_schedule_rounds"] == 2
    full = run(make_config(run={"num_rounds": 3}, train={**train, "lr_schedule_rounds": 2}))
    a, b = final_weights(full), final_weights(extended)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_rejects_math_changes_and_finished_runs(make_config):
    rd = run(make_config(run={"num_rounds": 1}))
    with pytest.raises(Exception, match="cannot change on resume"):
        resume(rd.path, ["train.lr=0.1"])
    with pytest.raises(RunError, match="already finished all 1 rounds"):
        resume(rd.path)
    saved = (rd.path / "config.json").read_bytes()
    with pytest.raises(RunError, match="already finished all 1 rounds"):
        resume(rd.path, ["run.progress=lines"])
    assert (rd.path / "config.json").read_bytes() == saved  # a refused resume leaves the config alone
    with pytest.raises(RunError, match="not a run folder"):
        resume(rd.path / "samples")


def test_resume_sets_a_damaged_checkpoint_aside_and_falls_back(make_config, capsys):
    full = final_weights(run(make_config()))
    rd = run(make_config(run={"checkpoint_every": 1}))
    newest = rd.path / "checkpoints" / "round-00002.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # a disk that lost the file's tail
    resume(rd.path)
    err = capsys.readouterr().err
    assert "round-00002.safetensors is damaged: 1000 bytes, but" in err and "resuming from round 1" in err
    assert (rd.path / "checkpoints" / "round-00002.safetensors.damaged").stat().st_size == 1000
    resumed = final_weights(rd)  # round 2 redone from round 1 gives the uninterrupted weights
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    for _, path in rd.checkpoints():
        path.write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"no readable checkpoint to resume from\n  checkpoint .*round-00002"):
        resume(rd.path)


def test_a_flipped_bit_in_a_checkpoint_is_caught_by_its_checksum(make_config, capsys):
    full = final_weights(run(make_config()))
    rd = run(make_config(run={"checkpoint_every": 1}))
    newest = rd.path / "checkpoints" / "round-00002.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight: safetensors alone would load it
    newest.write_bytes(bytes(data))
    side = json.loads(newest.with_suffix(".json").read_text())
    assert side["file_bytes"] == len(data) and side["round"] == 2
    resume(rd.path)
    err = capsys.readouterr().err
    assert "round-00002.safetensors is damaged: its contents do not match the CRC-32" in err
    assert "resuming from round 1" in err and (rd.path / "checkpoints" / "round-00002.safetensors.damaged").exists()
    resumed = final_weights(rd)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # a damaged checksum file makes its checkpoint unverifiable: passed over as well, named
    side_path = rd.path / "checkpoints" / "round-00002.json"
    side_path.write_text("{not json")
    with pytest.raises(RunError, match=r"round-00002.json is damaged"):
        rd.verify_checkpoint(rd.path / "checkpoints" / "round-00002.safetensors")


def test_exported_model_loads_in_ddpm_pipeline(make_config):
    from diffusers import DDPMPipeline

    rd = run(make_config(run={"num_rounds": 1}))
    pipe = DDPMPipeline.from_pretrained(rd.model_path)
    out = pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 1)


def test_a_damaged_run_folder_file_is_named(make_config):
    rd = run(make_config(run={"num_rounds": 1}))
    saved = (rd.path / "config.json").read_bytes()
    (rd.path / "manifest.json").write_text("{bad")
    with pytest.raises(RunError, match=r"cannot read .*manifest\.json"):
        resume(rd.path, ["run.num_rounds=2"])
    (rd.path / "manifest.json").unlink()
    (rd.path / "config.json").write_text("{bad")
    with pytest.raises(Exception, match=r"config\.json"):
        resume(rd.path, ["run.num_rounds=2"])
    (rd.path / "config.json").write_bytes(saved)
    resume(rd.path, ["run.num_rounds=2"])  # nothing else was overwritten: it continues
    assert [m["round"] for m in rd.read_metrics()] == [1, 2]
