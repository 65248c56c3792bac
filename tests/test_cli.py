"""The CLI end to end, in-process (and once in a subprocess that is killed mid-run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from feddiff.cli import main
from feddiff.runs import RunDir

TINY = """
[run]
num_rounds = {rounds}
seed = 3
progress = "lines"
[data]
root = "{root}"
image_size = 16
resize = "resize"
[partition]
method = "dirichlet"
num_clients = 2
alpha = 1.0
[model]
preset = "tiny"
[train]
lr = 1e-3
batch_size = 8
local_steps = {steps}
[eval]
grid_size = 4
num_inference_steps = 2
loss_num_samples = 16
"""


def write_config(tmp_path, root, rounds=2, steps=2):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY.format(root=root, rounds=rounds, steps=steps))
    return p


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_run_sample_partition(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir)
    out = tmp_path / "runs"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    rd = only_run(out)
    assert rd.name.startswith("tiny-")
    printed = capsys.readouterr().out
    assert "round   2/2" in printed and str(rd) in printed
    for f in ("config.json", "partition.json", "metrics.jsonl", "samples/final.png", "model/model_index.json"):
        assert (rd / f).is_file(), f
    assert len((rd / "metrics.jsonl").read_text().splitlines()) == 2

    grid = tmp_path / "grid.png"
    assert main(["sample", str(rd), "--num", "4", "--out", str(grid), "--steps", "2"]) == 0
    from PIL import Image

    assert Image.open(grid).size == (4 * 38, 4 * 38)  # 2x2 grid of 16 px with 2 px padding, enlarged 4x

    assert main(["partition", str(cfg)]) == 0
    table = capsys.readouterr().out
    assert "client" in table and "Ankle boot" in table
    hist = json.loads((rd / "partition.json").read_text())["label_histograms"]
    assert str(sum(hist[0])) in table


def test_bad_key_and_missing_dataset_are_clear(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir)
    assert main(["run", str(cfg), "--set", "train.lrate=1", "--out", str(tmp_path / "r")]) == 2
    assert "train.lrate: unknown key" in capsys.readouterr().err
    assert main(["run", str(cfg), "--set", f"data.root=\"{tmp_path / 'missing'}\"", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # no empty run folder left


def test_help_explains_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("run", "sample", "partition", "config"):
        assert cmd in text


def test_killed_run_resumes_to_same_weights(tmp_path, fmnist_dir):
    """SIGKILL a real process after its first checkpoint; the resumed run equals an uninterrupted one."""
    cfg = write_config(tmp_path, fmnist_dir, rounds=6, steps=25)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "feddiff.cli", "run", str(cfg), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        runs = list(out.glob("*/checkpoints/round-00001.safetensors")) if out.exists() else []
        if runs:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rd = only_run(out)
    done = len(RunDir(rd).read_metrics())
    assert done < 6, "the run finished before it could be killed"

    assert main(["run", "--resume", str(rd)]) == 0
    assert main(["run", str(cfg), "--out", str(tmp_path / "whole")]) == 0
    a = RunDir(rd).latest_checkpoint()[1]
    b = RunDir(only_run(tmp_path / "whole")).latest_checkpoint()[1]
    keys = [k for k in a if k.startswith("strategy/global/")]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    assert [m["round"] for m in RunDir(rd).read_metrics()] == [1, 2, 3, 4, 5, 6]
