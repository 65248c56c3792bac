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


def test_bad_values_are_messages_not_tracebacks(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir)
    out = tmp_path / "r"
    # an impossible pad is refused before any image is read
    assert main(["run", str(cfg), "--set", 'data.resize="pad"', "--out", str(out)]) == 2
    assert "data.resize='pad' cannot shrink fashion-mnist's 28x28 images to data.image_size=16" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["run", str(cfg), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    for argv, says in ((["model-info", "tiny", "--image-size", "0"], "must be >= 8, got 0"),
                       (["features", "train", "--dataset", "mnist"], "invalid choice: 'mnist'"),
                       (["eval", str(tmp_path), "--num-samples", "0"], "must be >= 2, got 0")):
        with pytest.raises(SystemExit):
            main(argv)
        assert says in capsys.readouterr().err


def test_sample_checks_its_flags_and_personal_checkpoints(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir, rounds=1, steps=1)
    out = tmp_path / "runs"
    assert main(["run", str(cfg), "--out", str(out), "--set", 'algorithm.name="udec"']) == 0
    rd = only_run(out)
    capsys.readouterr()
    for argv, says in ((["--out", str(tmp_path / "g")], "--out must name a .png file"),
                       (["--out", str(tmp_path / "g.png"), "--steps", "5000"], "--steps must be 1..1000"),
                       (["--out", str(tmp_path / "g.png")], "choose one with --client K")):
        assert main(["sample", str(rd), "--num", "2", *argv]) == 2
        assert says in capsys.readouterr().err
    # without the exported personal models, client 1's model comes from the checkpoint
    import shutil

    shutil.rmtree(rd / "models")
    assert main(["sample", str(rd), "--num", "2", "--steps", "2", "--client", "1", "--out", str(tmp_path / "c.png")]) == 0
    assert "checkpoint after round 1, client 1" in capsys.readouterr().out
    assert main(["sample", str(rd), "--num", "2", "--client", "7", "--out", str(tmp_path / "c.png")]) == 2
    assert "client 7 has no personal model after round 1; clients with one: [0, 1]" in capsys.readouterr().err
    (rd / "config.json").write_text("{\"run\": ")  # a config cut short
    assert main(["sample", str(rd), "--num", "2", "--out", str(tmp_path / "c.png")]) == 2
    assert "cannot read the saved config" in capsys.readouterr().err


def test_partition_shows_unused_samples(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir)
    over = ['partition.method="pathological"', 'partition.shard_rule="random"', "partition.classes_per_client=1",
            "partition.num_clients=3"]
    with pytest.warns(UserWarning, match="samples unused"):
        assert main(["partition", str(cfg), *[x for o in over for x in ("--set", o)]]) == 0
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.count("│") > 3}
    size = lambda row: int(rows[row].split("│")[2])  # noqa: E731
    assert size("all") + size("unused") == 400 and size("unused") > 0  # 3 clients x 1 class leave 7 classes out


def test_cli_name_lists_match_the_registries():
    from feddiff.cli import DATASET_NAMES, PRESET_NAMES
    from feddiff.data.sources import DATASETS
    from feddiff.model.presets import PRESETS

    assert sorted(DATASET_NAMES) == sorted(DATASETS) and sorted(PRESET_NAMES) == sorted(PRESETS)


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


def test_prune_prints_sizes_per_ratio_and_saves_a_loadable_model(tmp_path, capsys):
    # tiny at 16 px: levels (16, 32) with 8 GroupNorm groups of 2 and 4 channels
    assert main(["prune", "tiny", "--ratio", "0.25", "0.5", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    # kept per group int(size * (1 - ratio)): 0.25 -> 1 of 2 and 3 of 4; 0.5 -> 1 of 2 and 2 of 4
    assert "[16, 32]" in out and "[8, 24]" in out and "[8, 16]" in out
    assert main(["prune", "tiny", "--ratio", "0.2", "0.3", "--out", str(tmp_path / "m")]) == 2
    assert "give one --ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "tiny", "--ratio", "1.5"])
    assert "must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert main(["prune", "tiny", "--ratio", "0.5", "--image-size", "16", "--out", str(tmp_path / "m")]) == 0
    from feddiff.model.export import load_pipeline

    assert load_pipeline(tmp_path / "m").unet.conv_in.out_channels == 8


def test_sample_reads_a_pruned_personal_model_from_a_checkpoint(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir, rounds=2, steps=1)
    out = tmp_path / "runs"
    over = ['algorithm={name="udec", fraction=0.5}', "prune.ratio=0.5", "eval.loss_num_samples=8"]
    assert main(["run", str(cfg), "--out", str(out), *sum((["--set", o] for o in over), [])]) == 0
    rd = only_run(out)
    state = RunDir.open(rd).latest_checkpoint()[2]
    held = [k for k, m in state["clients"].items() if k.isdigit() and m["has_personal"]]
    assert held and all(state["clients"][k]["spec"] == state["strategy"]["spec"] for k in held)  # pruned at init
    import shutil

    shutil.rmtree(rd / "models")
    capsys.readouterr()
    assert main(["sample", str(rd), "--num", "2", "--steps", "2", "--client", held[0],
                 "--out", str(tmp_path / "c.png")]) == 0
    assert f"client {held[0]}" in capsys.readouterr().out


def test_sample_says_plainly_when_no_checkpoint_is_readable(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir, rounds=2, steps=1)
    out = tmp_path / "runs"
    assert main(["run", str(cfg), "--out", str(out), "--set", "run.keep_checkpoints=2"]) == 0
    rd = only_run(out)
    import shutil

    shutil.rmtree(rd / "model")
    for p in (rd / "checkpoints").glob("round-*.safetensors"):
        p.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["sample", str(rd), "--num", "2", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "none of its 2 checkpoints is readable: nothing to sample from" in err
    assert "using" not in err  # no "using an older checkpoint" for a checkpoint that is not there


def test_resume_removes_temp_files_a_killed_run_left(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir, rounds=1, steps=1)
    out = tmp_path / "runs"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    rd = only_run(out)
    stale = rd / "checkpoints" / ".round-00002.safetensors.tmp-99999999"  # no such process
    stale.write_bytes(b"half")
    mine = rd / "checkpoints" / f".round-00002.safetensors.tmp-{os.getppid()}"  # a live process: kept
    mine.write_bytes(b"busy")
    assert [r for r, _ in RunDir.open(rd).checkpoints()] == [1]  # temp files never count as checkpoints
    assert main(["run", "--resume", str(rd), "--set", "run.num_rounds=2"]) == 0
    assert not stale.exists() and mine.exists()
    assert "removed checkpoints/.round-00002.safetensors.tmp-99999999" in capsys.readouterr().out


def test_resume_before_any_checkpoint_prints_the_command_that_starts_it_again(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir, rounds=1, steps=1)
    out = tmp_path / "runs"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    rd = only_run(out)
    first = RunDir.open(rd).load_checkpoint(RunDir.open(rd).checkpoints()[-1][1])[1]
    for p in (rd / "checkpoints").iterdir():  # as if killed before its first checkpoint
        p.unlink()
    capsys.readouterr()
    assert main(["run", "--resume", str(rd)]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint: it stopped before its first one was saved" in err
    command = err.split("Start it again (in a new run folder) with:\n")[1].split()
    assert command == ["feddiff", "run", str(rd / "config.json")]
    assert main([*command[1:], "--out", str(tmp_path / "again")]) == 0  # the printed command works
    again = only_run(tmp_path / "again")
    redone = RunDir.open(again).load_checkpoint(RunDir.open(again).checkpoints()[-1][1])[1]
    assert redone.keys() == first.keys() and all(torch.equal(redone[k], first[k]) for k in first)


def test_an_empty_config_file_warns_and_names_what_runs(tmp_path, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing here yet\n")
    with pytest.warns(UserWarning, match="sets nothing, so every setting takes its default: fashion-mnist"):
        assert main(["config", str(empty)]) == 0
    # as a person sees it: one plain line on stderr
    proc = subprocess.run([sys.executable, "-m", "feddiff.cli", "config", str(empty)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": ""}, timeout=120)
    assert proc.returncode == 0
    assert proc.stderr.startswith(f"warning: {empty} sets nothing, so every setting takes its default: fashion-mnist")
    assert "10 rounds" in proc.stderr and "feddiff config" in proc.stderr and "UserWarning" not in proc.stderr


def test_sample_falls_back_to_the_checkpoint_when_the_export_is_damaged(tmp_path, fmnist_dir, capsys):
    cfg = write_config(tmp_path, fmnist_dir, rounds=1, steps=1)
    out = tmp_path / "runs"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    rd = only_run(out)
    args = ["--num", "2", "--steps", "2", "--seed", "5"]
    assert main(["sample", str(rd), *args, "--out", str(tmp_path / "a.png")]) == 0
    weights = rd / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])  # a copy cut short
    capsys.readouterr()
    assert main(["sample", str(rd), *args, "--out", str(tmp_path / "b.png")]) == 0
    io = capsys.readouterr()
    assert f"the exported model {rd / 'model' / 'unet'} is damaged" in io.err
    assert "from checkpoint after round 1" in io.out
    # the last checkpoint holds the exported weights: the same images
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_sigkill_at_random_moments_and_mid_checkpoint_resumes_to_the_same_state(tmp_path, fmnist_dir):
    """Kill a real run again and again (at random moments, and while a checkpoint file is being
    written), resume it each time; every tensor of its last checkpoint equals an uninterrupted run's."""
    import random

    cfg = write_config(tmp_path, fmnist_dir, rounds=5, steps=8)
    sets = ["--set", 'algorithm.name="scaffold"', "--set", 'train.optimizer="sgd"', "--set", "train.lr=0.05",
            "--set", "train.keep_optimizer_state=true", "--set", 'compress.uplink.codec="int8"',
            "--set", 'compress.uplink.mode="delta"', "--set", "compress.uplink.error_feedback=true"]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(11)
    fresh = [sys.executable, "-m", "feddiff.cli", "run", str(cfg), "--out", str(out), *sets]
    mid_write = 0
    for attempt in range(6):
        runs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
        resumable = runs and RunDir(runs[0]).checkpoints()
        if runs and not resumable:  # killed before its first checkpoint: nothing to resume, start again
            import shutil

            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "feddiff.cli", "run", "--resume", str(runs[0])] if resumable else fresh
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not resumable:  # a fresh run is killed only once it has a checkpoint: every kill leaves one to resume
            start = time.time()
            while proc.poll() is None and time.time() < start + 120 and not any(
                    RunDir(p).checkpoints() for p in (out.iterdir() if out.exists() else []) if p.is_dir()):
                time.sleep(0.01)
        deadline = time.time() + (120 if attempt % 2 == 0 else rng.uniform(1.0, 4.0))
        while time.time() < deadline and proc.poll() is None:
            if attempt % 2 == 0 and list(out.glob("*/checkpoints/.round-*.tmp-*")):
                break  # a checkpoint is being written right now
            time.sleep(0.001)
        if proc.poll() is not None:
            break  # it finished first
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_write += bool(list(out.glob("*/checkpoints/.round-*.tmp-*")))
    rd = only_run(out)
    if len(RunDir(rd).read_metrics()) < 5 or not RunDir(rd).checkpoints() or RunDir(rd).checkpoints()[-1][0] < 5:
        assert main(["run", "--resume", str(rd)]) == 0
    assert mid_write >= 1, "no kill landed during a checkpoint write"
    assert main(["run", str(cfg), "--out", str(tmp_path / "whole"), *sets]) == 0
    a = RunDir(rd).latest_checkpoint()[1]
    b = RunDir(only_run(tmp_path / "whole")).latest_checkpoint()[1]
    assert a.keys() == b.keys() and any(k.startswith("client/0/") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # model, control variates, residuals, optimizer states
    assert [m["round"] for m in RunDir(rd).read_metrics()] == [1, 2, 3, 4, 5]
    assert not list(rd.glob("checkpoints/.round-*.tmp-*"))  # the last resume removed what the kills left


def test_main_leaves_the_warning_format_as_it_found_it(capsys):
    import warnings

    before = warnings.formatwarning
    assert main(["config"]) == 0
    assert warnings.formatwarning is before
