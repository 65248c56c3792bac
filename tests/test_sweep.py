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
