import json

from feddiff.cli import main
from feddiff.config import load_config
from feddiff.sweep import expand

CFG = """
[run]
num_rounds = 1
seed = 3
progress = "none"
[data]
root = "{root}"
image_size = 16
resize = "resize"
max_train_samples = 200
[partition]
num_clients = 2
[model]
preset = "tiny"
[train]
batch_size = 8
local_steps = 1
[eval]
grid_size = 1
num_inference_steps = 1
loss_num_samples = 8
[sweep.grid]
"partition.method" = ["iid", "quantity"]
"algorithm.name" = ["fedavg", "udec"]
"""


def test_expand_grid_order_and_names(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(CFG.format(root=tmp_path))
    points = expand(load_config(p))
    assert [pt.name for pt in points] == ["method=iid_algorithm=fedavg", "method=iid_algorithm=udec",
                                          "method=quantity_algorithm=fedavg", "method=quantity_algorithm=udec"]
    assert points[1].overrides == ['partition.method="iid"', 'algorithm.name="udec"']


def test_sweep_runs_resumes_and_summarizes(tmp_path, fmnist_dir, capsys):
    p = tmp_path / "s.toml"
    p.write_text(CFG.format(root=fmnist_dir))
    assert main(["sweep", str(p), "--out", str(tmp_path / "out")]) == 0
    folder = next((tmp_path / "out").iterdir())
    rows = json.loads((folder / "summary.json").read_text())
    assert len(rows) == 4
    by = {(r["split"].split("(")[0], r["algorithm"]): r for r in rows}
    assert by[("iid", "fedavg")]["savings"] == 0.0
    assert 0 < by[("iid", "udec")]["savings"] < 1
    out = capsys.readouterr().out
    assert "savings vs FULL" in out

    # a lost point is redone on resume; finished ones are skipped
    import shutil

    shutil.rmtree(folder / "method=quantity_algorithm=udec")
    assert main(["sweep", "--resume", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "[1/4] method=iid_algorithm=fedavg: done" in out
    assert "[4/4] method=quantity_algorithm=udec: new" in out
    assert (folder / "method=quantity_algorithm=udec" / "metrics.jsonl").is_file()


def test_sweep_needs_a_grid(tmp_path, fmnist_dir, capsys):
    p = tmp_path / "s.toml"
    p.write_text(CFG.format(root=fmnist_dir).split("[sweep.grid]")[0])
    assert main(["sweep", str(p)]) == 2
    assert "has no [sweep.grid] or [sweep.variants]" in capsys.readouterr().err


def test_variants_bundle_overrides(tmp_path):
    p = tmp_path / "v.toml"
    p.write_text(CFG.format(root=tmp_path).split("[sweep.grid]")[0] + """
[sweep.grid]
"partition.method" = ["iid"]
[sweep.variants]
vanilla = []
int8 = ["compress.uplink.codec=\\"int8\\"", "compress.uplink.mode=\\"delta\\""]
""")
    points = expand(load_config(p))
    assert [pt.name for pt in points] == ["method=iid_vanilla", "method=iid_int8"]
    assert points[1].overrides == ['partition.method="iid"', 'compress.uplink.codec="int8"', 'compress.uplink.mode="delta"']
    assert load_config(p, points[1].overrides).compress.uplink.codec == "int8"


# -- a folder that is not a sweep, points checked before anything runs, resume settings ---------


def _grid(cfg_text: str, grid: str) -> str:
    return cfg_text.split("[sweep.grid]")[0] + "[sweep.grid]\n" + grid


def test_summary_of_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    assert main(["sweep", "--summary", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} is not a sweep folder (no sweep.json)" in capsys.readouterr().err
    assert main(["sweep", "--summary", str(tmp_path)]) == 2
    assert "is not a sweep folder (no sweep.json)" in capsys.readouterr().err


def test_dry_run_checks_every_point(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text(CFG.format(root=tmp_path))
    assert main(["sweep", str(p), "--set", 'sweep.grid={"train.lrr"=[1]}', "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "sweep point 'lrr=1'" in captured.err and "train.lrr: unknown key" in captured.err
    assert "runs" not in captured.out

    # an empty value list is an error naming the key, in a dry run and in a real one (no folder made)
    p.write_text(_grid(CFG.format(root=tmp_path), '"algorithm.name" = ["fedavg"]\n"train.lr" = []\n'))
    for extra in (["--dry-run"], ["--out", str(tmp_path / "out")]):
        assert main(["sweep", str(p), *extra]) == 2
        assert "sweep.grid key 'train.lr' has an empty list of values" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_and_summary_refuse_other_settings(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text(CFG.format(root=tmp_path))
    for argv, named in ((["--resume", str(tmp_path), "--set", "run.seed=4"], "--set"),
                        (["--resume", str(tmp_path), "--out", str(tmp_path)], "--out"),
                        (["--resume", str(tmp_path), str(p)], "CONFIG"),
                        (["--summary", str(tmp_path), "--set", "run.seed=4"], "--set")):
        assert main(["sweep", *argv]) == 2
        err = capsys.readouterr().err
        assert f"SWEEP_DIR takes no {named}" in err
    assert main(["sweep", "--resume", str(tmp_path), "--set", "run.seed=4"]) == 2
    assert "resumes with the settings it started with" in capsys.readouterr().err


def test_resume_needs_neither_the_config_file_nor_the_folder(tmp_path, fmnist_dir, capsys, monkeypatch):
    start = tmp_path / "start"
    start.mkdir()
    (start / "s.toml").write_text(_grid(CFG.format(root=fmnist_dir), '"algorithm.name" = ["fedavg", "udec"]\n'))
    monkeypatch.chdir(start)
    assert main(["sweep", "s.toml", "--set", "train.lr=2e-3", "--out", str(tmp_path / "out")]) == 0
    folder = next((tmp_path / "out").iterdir())
    spec = json.loads((folder / "sweep.json").read_text())
    assert spec["base"]["run"]["name"] == "s" and spec["overrides"] == ["train.lr=2e-3"]

    # the TOML file changes (here: is gone) and the resume runs elsewhere: same settings as the start
    import shutil

    (start / "s.toml").unlink()
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(folder / "algorithm=udec")
    capsys.readouterr()
    assert main(["sweep", "--resume", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] algorithm=fedavg: done" in out and "[2/2] algorithm=udec: new" in out
    cfg = json.loads((folder / "algorithm=udec" / "config.json").read_text())
    assert cfg["train"]["lr"] == 2e-3 and cfg["algorithm"]["name"] == "udec" and cfg["run"]["name"] == "s"

    # an older sweep.json holds only the config path as given: still read, from the folder it names
    del spec["base"]
    (folder / "sweep.json").write_text(json.dumps(spec))
    assert main(["sweep", "--resume", str(folder)]) == 2
    assert "names the config 's.toml' only" in capsys.readouterr().err
    (start / "s.toml").write_text(_grid(CFG.format(root=fmnist_dir), '"algorithm.name" = ["fedavg", "udec"]\n'))
    monkeypatch.chdir(start)
    assert main(["sweep", "--resume", str(folder)]) == 0
    assert "[2/2] algorithm=udec: done" in capsys.readouterr().out


# -- folder names, baselines, the point column ----------------------------------------------------


def test_point_names_are_safe_and_unique(tmp_path):
    from feddiff.sweep import safe_name

    p = tmp_path / "s.toml"
    p.write_text(_grid(CFG.format(root=tmp_path),
                       '"data.root" = ["/data/fm", "data fm", "/data/fm", "DATA-FM"]\n'
                       '"model.block_out_channels" = [[32, 64]]\n'))
    names = [pt.name for pt in expand(load_config(p))]
    assert names == ["root=-data-fm_block_out_channels=[32,64]", "root=data-fm_block_out_channels=[32,64]",
                     "root=-data-fm_block_out_channels=[32,64]-2", "root=DATA-FM_block_out_channels=[32,64]-2"]
    assert all("/" not in n and " " not in n for n in names)
    # ordinary values keep their names (existing sweep folders resume by them)
    for name in ("method=iid_algorithm=fedavg", "lr=0.001_seed=3", "alpha=1e-05_int8", "mu=-1.5"):
        assert safe_name(name) == name
    assert safe_name("..") == "point" and safe_name("../x") == "-x"
    long = safe_name("root=" + "a" * 300)
    assert len(long) == 150 and long != safe_name("root=" + "a" * 299)


def _row(name, algorithm, total, seed=0):
    return {"name": name, "algorithm": algorithm, "split": "iid", "clients": 2, "seed": seed,
            "rounds": 1, "bytes_total": total}


def test_compare_baseline_matches_the_other_grid_keys():
    from feddiff.report import compare
    from feddiff.sweep import point_settings

    rows = [_row("lr=1_fedavg", "fedavg", 100), _row("lr=1_udec", "udec", 50),
            _row("lr=2_fedavg", "fedavg", 200), _row("lr=2_udec", "udec", 50)]
    overrides = {"lr=1_fedavg": ["train.lr=1", 'algorithm.name="fedavg"'],
                 "lr=1_udec": ["train.lr=1", 'algorithm.name="udec"'],
                 "lr=2_fedavg": ["train.lr=2", 'algorithm.name="fedavg"'],
                 "lr=2_udec": ["train.lr=2", 'algorithm.name="udec"']}
    out = {r["name"]: r for r in compare(rows, settings={k: point_settings(v) for k, v in overrides.items()})}
    assert out["lr=1_udec"]["savings"] == 0.5 and out["lr=1_udec"]["baseline"] == "lr=1_fedavg"
    assert out["lr=2_udec"]["savings"] == 0.75 and out["lr=2_udec"]["baseline"] == "lr=2_fedavg"
    assert out["lr=2_fedavg"]["savings"] == 0.0

    # without settings (or without a match), the group's first FedAvg row
    rows = compare([_row("a", "fedavg", 100), _row("b", "fedavg", 200), _row("c", "udec", 50),
                    _row("d", "udec", 50, seed=1)])
    assert rows[2]["baseline"] == "a" and rows[2]["savings"] == 0.5
    assert "savings" not in rows[3]  # no FedAvg run with that seed


def test_summary_table_shows_the_point_name():
    from rich.console import Console

    from feddiff.report import compare, table

    rows = compare([_row("lr=1_fedavg", "fedavg", 100), _row("lr=[2]_fedavg", "fedavg", 100)])
    console = Console(record=True, width=200)
    console.print(table(rows, "sweep"))
    text = console.export_text()
    assert "point" in text and "lr=1_fedavg" in text and "lr=[2]_fedavg" in text


# -- repeats vary the training seed, not the data split --------------------------------------------


def _split_hashes(p, overrides=()):
    from feddiff.data.partition import partition_hash
    from feddiff.engines.experiment import partition_train
    from tests.conftest import synthetic_images

    _, labels = synthetic_images(400, 0)
    out = []
    for pt in expand(load_config(p, list(overrides))):
        cfg = load_config(p, [*overrides, *pt.overrides])
        subset, parts = partition_train(cfg, labels)
        out.append((pt.name, cfg.run.seed, cfg.partition.seed, partition_hash(parts), subset.tolist()))
    return out


def test_repeats_keep_the_partition(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(_grid(CFG.format(root=tmp_path), '"partition.method" = ["dirichlet"]\n')
                 .replace("[sweep.grid]", "[sweep]\nrepeats = 3\n[sweep.grid]"))
    points = expand(load_config(p))
    assert [pt.name for pt in points] == [f"method=dirichlet_seed={s}" for s in (3, 4, 5)]
    assert points[1].overrides == ['partition.method="dirichlet"', "run.seed=4", "partition.seed=3"]
    rows = _split_hashes(p)
    assert [r[1] for r in rows] == [3, 4, 5] and {r[2] for r in rows} == {3}
    assert len({r[3] for r in rows}) == 1 and all(r[4] == rows[0][4] for r in rows)  # one split, subset too

    # an explicit partition.seed in the base config is kept as it is (no override added)
    rows = _split_hashes(p, ["partition.seed=9"])
    assert {r[2] for r in rows} == {9} and len({r[3] for r in rows}) == 1
    assert all("partition.seed" not in o for pt in expand(load_config(p, ["partition.seed=9"])) for o in pt.overrides)
    assert rows[0][3] != _split_hashes(p)[0][3]

    # partition.seed on the grid: each value its own split, shared by that value's repeats
    p.write_text(_grid(CFG.format(root=tmp_path), '"partition.method" = ["dirichlet"]\n"partition.seed" = [1, 2]\n')
                 .replace("[sweep.grid]", "[sweep]\nrepeats = 2\n[sweep.grid]"))
    rows = _split_hashes(p)
    assert [(r[1], r[2]) for r in rows] == [(3, 1), (4, 1), (3, 2), (4, 2)]
    assert rows[0][3] == rows[1][3] != rows[2][3] == rows[3][3]

    # one run per point: nothing changes (the split follows run.seed, as before partition.seed existed)
    p.write_text(_grid(CFG.format(root=tmp_path), '"partition.method" = ["dirichlet"]\n'))
    assert expand(load_config(p))[0].overrides == ['partition.method="dirichlet"']


# -- a point is done only once its final checkpoint and export are on disk ---------------------------


def _two_rounds(tmp_path, fmnist_dir):
    p = tmp_path / "s.toml"
    p.write_text(_grid(CFG.format(root=fmnist_dir).replace("num_rounds = 1", "num_rounds = 2"),
                       '"algorithm.name" = ["fedavg"]\n'))
    assert main(["sweep", str(p), "--out", str(tmp_path / "out")]) == 0
    folder = next((tmp_path / "out").iterdir())
    return folder, folder / "algorithm=fedavg"


def _final_tensors(run):
    from feddiff.runs import RunDir

    rd = RunDir(run)
    _, tensors, _ = rd.load_checkpoint(dict(rd.checkpoints())[2])
    return tensors


def test_point_without_its_final_checkpoint_is_resumed(tmp_path, fmnist_dir, capsys):
    import torch

    folder, run = _two_rounds(tmp_path, fmnist_dir)
    final = run / "checkpoints" / "round-00002.safetensors"
    expected = _final_tensors(run)
    # killed after the last metrics line was written, before the final checkpoint was
    final.unlink()
    final.with_suffix(".json").unlink()
    assert [r["round"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    capsys.readouterr()
    assert main(["sweep", "--resume", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "[1/1] algorithm=fedavg: resume" in out
    assert final.is_file()
    got = _final_tensors(run)
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert [r["round"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert main(["sweep", "--resume", str(folder)]) == 0
    assert "[1/1] algorithm=fedavg: done" in capsys.readouterr().out


def test_a_point_whose_checkpoints_fail_their_checksum_is_restarted(tmp_path, fmnist_dir, capsys):
    from feddiff.runs import RunDir

    folder, run = _two_rounds(tmp_path, fmnist_dir)
    for _, path in RunDir(run).checkpoints():  # one flipped bit each: safetensors alone would open them
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["sweep", "--resume", str(folder)]) == 0  # it had been taken as resumable, then failed
    out = capsys.readouterr().out
    assert "[1/1] algorithm=fedavg: restart" in out
    assert _final_tensors(run)


def test_point_with_a_damaged_final_checkpoint_or_export_is_redone(tmp_path, fmnist_dir, capsys):
    import shutil

    folder, run = _two_rounds(tmp_path, fmnist_dir)
    final = run / "checkpoints" / "round-00002.safetensors"
    final.write_bytes(final.read_bytes()[:100])  # cut short
    capsys.readouterr()
    assert main(["sweep", "--resume", str(folder)]) == 0
    assert "[1/1] algorithm=fedavg: resume" in capsys.readouterr().out
    assert _final_tensors(run)

    # the final checkpoint is there but the exported model is not: the last round is redone
    shutil.rmtree(run / "model")
    assert main(["sweep", "--resume", str(folder)]) == 0
    assert "[1/1] algorithm=fedavg: resume" in capsys.readouterr().out
    assert (run / "model" / "model_index.json").is_file() and _final_tensors(run)
    assert main(["sweep", "--resume", str(folder)]) == 0
    assert "[1/1] algorithm=fedavg: done" in capsys.readouterr().out
