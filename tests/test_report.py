"""feddiff report: the table's numbers are the runs' metrics.jsonl numbers; plots, grids, HTML, live view."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from feddiff.cli import main
from feddiff.engines.runner import run
from feddiff.report.document import build_report, table_cells
from feddiff.runs import RunError

EVAL = {"fid_num_samples": 12, "grid_size": 4, "num_inference_steps": 2, "every_rounds": 1}


@pytest.fixture(scope="module")
def two_runs(fmnist_dir, tmp_path_factory):
    """A FedAvg run of 3 rounds and a UDEC run (personal models) of 2, evaluated every round."""
    from tests.conftest import tiny_config

    out = tmp_path_factory.mktemp("runs")
    a = run(tiny_config(fmnist_dir, out, run={"name": "avg", "num_rounds": 3}, eval=EVAL))
    b = run(tiny_config(fmnist_dir, out, run={"name": "udec"}, algorithm={"name": "udec"},
                        partition={"num_clients": 3}, eval=EVAL))
    return a.path, b.path


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_table_numbers_are_the_runs_numbers(two_runs, tmp_path):
    a, b = two_runs
    rep = build_report([a, b], tmp_path / "rep")
    rows = {r["name"]: r for r in json.loads(rep.summary.read_text())}
    ma, mb = metrics(a), metrics(b)

    ra = rows[a.name]
    fds = [m["eval"]["fd"] for m in ma]
    assert ra["rounds"] == 3 and ra["num_rounds"] == 3 and ra["status"] == "finished"
    assert ra["fd"] == fds[-1] and ra["fd_best"] == min(fds) and ra["fd_best_round"] == 1 + fds.index(min(fds))
    assert ra["is_mean"] == ma[-1]["eval"]["is_mean"] and ra["kid_mean"] == ma[-1]["eval"]["kid_mean"]
    # bytes: the per-round records summed by hand equal the table's per-tier and total numbers
    per_round = sum(m["bytes"]["client-server"]["up"] + m["bytes"]["client-server"]["down"] for m in ma)
    assert ra["bytes_tiers"] == {"client-server": per_round} and ra["bytes_total"] == per_round
    assert ra["parameters"] == ma[0]["model_cost"]["parameters"] and ra["wall_s"] == ma[-1]["elapsed_s"]
    assert ra["method"] == "fedavg" and ra["dataset"] == "fashion-mnist 16px" and ra["split"] == "label-skew(1.0)"

    rb = rows[b.name]  # personal models: mean and spread over clients, best of the means
    ev = mb[-1]["eval"]
    client_fds = [m["fd"] for m in ev["models"].values()]
    assert len(client_fds) == 3 and rb["fd"] == pytest.approx(sum(client_fds) / 3, rel=1e-12)
    assert rb["fd_std"] == ev["fd_std"] and rb["fd_best"] == min(m["eval"]["fd_mean"] for m in mb)

    # the same numbers, formatted, in the Markdown table and the HTML page
    cols, cells = table_cells(json.loads(rep.summary.read_text()))
    row_a = dict(zip(cols, cells[[r["name"] for r in json.loads(rep.summary.read_text())].index(a.name)]))
    assert row_a["final"] == f"{fds[-1]:.2f}" and row_a["MB total"] == f"{per_round / 1e6:.2f}"
    assert row_a["metric [protocol]"] == "FD-domain [1]"  # both runs measured alike: one protocol
    assert row_a["savings vs FedAvg"] == "baseline"
    md, page = rep.markdown.read_text(), rep.html.read_text()
    for text in (f"{fds[-1]:.2f}", f"{min(fds):.2f} ({1 + fds.index(min(fds))})", f"{ev['fd_mean']:.2f} ± {ev['fd_std']:.2f}"):
        assert text in md and text in page


def test_figures_and_grids_written(two_runs, tmp_path):
    a, b = two_runs
    rep = build_report([a.parent], tmp_path / "rep")  # a folder of runs stands for the runs in it
    assert {r["name"] for r in rep.rows} == {a.name, b.name}
    names = {p.name for p in rep.figures.values()}
    assert {"quality_vs_round.png", "quality_vs_bytes.png", "bytes_per_round.png", "client_spread.png"} <= names
    assert len([n for n in names if n.startswith("partition-")]) == 2  # two different splits
    for p in rep.figures.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert len(rep.grids[a.name]) == 1 and len(rep.grids[b.name]) == 3  # one grid per personal model
    md = rep.markdown.read_text()
    for p in [*rep.figures.values(), *rep.grids[b.name]]:
        assert f"]({p.relative_to(rep.html.parent).as_posix()})" in md
    page = rep.html.read_text()
    assert page.count("src='data:image/png;base64,") == len(rep.figures) + 4 and "src='http" not in page


def test_partial_run_and_refusals(two_runs, tmp_path):
    a, _ = two_runs
    partial = tmp_path / "partial"
    shutil.copytree(a, partial)
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # a line cut mid-write
    rep = build_report([partial], tmp_path / "rep")
    assert rep.rows[0]["rounds"] == 2 and rep.rows[0]["status"] == "running or stopped at round 2 of 3"
    # re-running over the same folder replaces the report; a build that fails leaves the old one whole
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "rep").rglob("*") if p.is_file()}
    import feddiff.report.document as document

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    original = document._html
    document._html = broken
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            build_report([partial, a], tmp_path / "rep")
    finally:
        document._html = original
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "rep").rglob("*") if p.is_file()}
    assert after == before and not [p for p in tmp_path.iterdir() if ".building-" in p.name]
    rep2 = build_report([partial, a], tmp_path / "rep")
    assert len(rep2.rows) == 2 and len(json.loads((tmp_path / "rep" / "summary.json").read_text())) == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(RunError, match=r"not a feddiff report.*thesis\.tex"):
        build_report([partial], tmp_path / "mine")
    with pytest.raises(RunError, match="inside the run folder"):
        build_report([partial], partial / "report")
    with pytest.raises(RunError, match="no such run folder"):
        build_report([tmp_path / "nope"], tmp_path / "rep")
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 2


def test_cli_report(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "r"), "--title", "two <runs>"]) == 0
    assert "2 run(s)" in capsys.readouterr().out
    page = (tmp_path / "r" / "report.html").read_text()
    assert "<title>two &lt;runs&gt;</title>" in page  # text is escaped


def test_live_progress_and_round_line(two_runs):
    from feddiff.engines.loop import live_status, round_line
    from feddiff.engines.progress import RoundProgress

    a, _ = two_runs
    ma = metrics(a)
    sent = sum(ma[0]["bytes"]["client-server"].values())
    assert f"sent {sent / 1e6:.1f} MB so far" in round_line(ma[0], 3)
    bar = RoundProgress("bar", 3)
    try:
        bar.end_round(0, round_line(ma[0], 3), live_status(ma[0]))
        rec = {**ma[1]}
        rec.pop("eval")  # a round without evaluation keeps showing the last metric
        bar.start_round(2, [0, 1], 4)
        bar.end_round(1, round_line(rec, 3), live_status(rec))
        text = bar._bar.tasks[0].description
    finally:
        bar.close()
    assert text.startswith("round 2/3") and f"loss {ma[1]['loss']:.4f}" in text
    assert f"FD-domain {ma[0]['eval']['fd']:.2f} (round 1)" in text
    assert f"sent {sum(sum(d.values()) for d in ma[1]['bytes_cumulative'].values()) / 1e6:.1f} MB" in text


def test_tensorboard_scalars_equal_metrics(make_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rd = run(make_config(run={"tensorboard": True}, eval=EVAL))
    acc = EventAccumulator(str(rd.path / "tensorboard"))
    acc.Reload()
    ms = metrics(rd.path)
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(m["round"], pytest.approx(m["loss"], rel=1e-6)) for m in ms]
    fd = [e.value for e in acc.Scalars("eval/FD-domain")]
    assert fd == [pytest.approx(m["eval"]["fd"], rel=1e-6) for m in ms]
    sent = [e.value for e in acc.Scalars("bytes_cumulative/training")]
    assert sent == [sum(sum(d.values()) for d in m["bytes_cumulative"].values()) for m in ms]


def test_tensorboard_missing_stops_the_run_before_training_and_resume_can_turn_it_off(monkeypatch, make_config):
    from feddiff.config import ConfigError
    from feddiff.engines import tensorboard
    from feddiff.engines.runner import resume

    rd = run(make_config(run={"tensorboard": True, "num_rounds": 1}))
    monkeypatch.setattr(tensorboard, "available", lambda: False)  # a machine without the package
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        run(make_config(run={"tensorboard": True, "name": "again"}))
    again = [p for p in rd.path.parent.iterdir() if p.name.startswith("again")]
    assert len(again) == 1 and not (again[0] / "metrics.jsonl").exists()  # refused before round 1
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        resume(rd.path, ["run.num_rounds=2"])
    resume(rd.path, ["run.num_rounds=2", "run.tensorboard=false"])  # the way out the message names
    assert [m["round"] for m in metrics(rd.path)] == [1, 2]


def test_tensorboard_resume_continues_the_steps(make_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from feddiff.engines.runner import resume

    rd = run(make_config(run={"tensorboard": True, "num_rounds": 2}))
    resume(rd.path, ["run.num_rounds=3"])
    acc = EventAccumulator(str(rd.path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/loss")] == [pytest.approx(m["loss"], rel=1e-6) for m in metrics(rd.path)]


@pytest.fixture(scope="module")
def more_runs(fmnist_dir, tmp_path_factory):
    """FedAvg with int8 uploads, FedPhD (two tiers), and a run evaluated only by held-out loss."""
    from tests.conftest import tiny_config

    out = tmp_path_factory.mktemp("more")
    q = run(tiny_config(fmnist_dir, out, run={"name": "avg-int8", "num_rounds": 3}, eval=EVAL,
                        compress={"uplink": {"codec": "int8"}}))
    h = run(tiny_config(fmnist_dir, out, run={"name": "phd"}, partition={"num_clients": 4},
                        algorithm={"name": "fedphd", "num_edges": 2, "central_every": 1}, eval=EVAL))
    plain = run(tiny_config(fmnist_dir, out, run={"name": "noeval", "num_rounds": 1}))
    return q.path, h.path, plain.path


def test_tiers_baselines_and_runs_without_fd(two_runs, more_runs, tmp_path):
    a, _ = two_runs
    q, h, plain = more_runs
    rep = build_report([a, q, h, plain], tmp_path / "rep")
    rows = {r["name"]: r for r in rep.rows}
    # FedPhD: both tiers, each the sum of its per-round records plus the setup traffic
    mh = metrics(h)
    for tier in ("client-edge", "edge-cloud"):
        by_hand = sum(sum(m["bytes"].get(tier, {}).values()) + sum(m.get("bytes_setup", {}).get(tier, {}).values())
                      for m in mh)
        assert rows[h.name]["bytes_tiers"][tier] == by_hand
    cols, _ = table_cells(rep.rows)
    assert {"MB client-edge", "MB edge-cloud", "MB client-server"} <= set(cols)
    # a FedAvg run with an int8 codec is not the FedAvg baseline: the plain one is, for the run with
    # as many rounds; the 2-round FedPhD has none (its bytes are not comparable with 3 rounds')
    assert rows[q.name]["method"] == "fedavg + up int8" and rows[q.name]["baseline"] == a.name
    assert rows[q.name]["savings"] == pytest.approx(1 - rows[q.name]["bytes_total"] / rows[a.name]["bytes_total"])
    assert "savings" not in rows[h.name], rows[h.name]
    assert rows[plain.name]["baseline"] == plain.name  # the only 1-round FedAvg is its own baseline
    # no FD anywhere in the no-eval run: its row says so, and the report still has its figures
    assert "fd" not in rows[plain.name] and rows[plain.name]["heldout_loss"] == metrics(plain)[-1]["eval"]["heldout_loss"]
    assert "bytes_per_round.png" in {p.name for p in rep.figures.values()}


def test_names_are_unique_escaped_and_never_math(two_runs, tmp_path):
    a, _ = two_runs
    for parent, name in (("s1", "same"), ("s2", "same"), ("s3", "cost $5 <i>x | *y*")):
        shutil.copytree(a, tmp_path / "runs" / parent / name)
    rep = build_report([tmp_path / "runs" / "s1" / "same", tmp_path / "runs" / "s2" / "same",
                        tmp_path / "runs" / "s3" / "cost $5 <i>x | *y*"], tmp_path / "rep")
    names = [r["name"] for r in rep.rows]
    assert names == ["s1/same", "s2/same", "cost $5 <i>x | *y*"]
    assert sum(len(v) for v in rep.grids.values()) == 3 and len({p.name for v in rep.grids.values() for p in v}) == 3
    page, md = rep.html.read_text(), rep.markdown.read_text()
    assert "<i>x" not in page and "cost $5 &lt;i&gt;x | *y*" in page
    assert "<i>" not in md and r"cost $5 &lt;i&gt;x \| \*y\*" in md
    assert all(line.count(" | ") == md.splitlines()[4].count(" | ") for line in md.splitlines()[6:9])


def test_empty_sweep_and_folders_of_sweeps(two_runs, tmp_path):
    a, _ = two_runs
    empty = tmp_path / "sw"
    empty.mkdir()
    (empty / "sweep.json").write_text(json.dumps({"points": [{"name": "p1", "overrides": []}]}))
    with pytest.raises(RunError, match="no started run"):
        build_report([empty], tmp_path / "rep")
    shutil.copytree(a, empty / "p1")  # the point has started: the folder of sweeps finds it
    rep = build_report([tmp_path], tmp_path.parent / f"{tmp_path.name}-rep")
    assert [r["name"] for r in rep.rows] == ["p1"]
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RunError, match="is a file, not a run folder"):
        build_report([tmp_path / "file.txt"], tmp_path / "rep2")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium (make test installs Debian's chromium when run as root)")
    rep = build_report(list(two_runs), tmp_path / "rep")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]

    def status(page: Path) -> str:
        dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        start = dom.find('data-status="')
        return dom[start + 13 : dom.find('"', start + 13)] if start >= 0 else "no status (the page's script did not run)"

    assert status(rep.html) == "ok"
    png = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={png}", "--window-size=1400,2000", rep.html.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    # the check can fail: a missing image and a script error are reported by the page
    broken = tmp_path / "broken.html"
    broken.write_text(rep.html.read_text().replace("src='data:image/png;base64,", "src='missing.png#", 1))
    assert status(broken).startswith("missing image")
    broken.write_text(rep.html.read_text().replace("</body>", "<script>undefinedFunction()</script></body>"))
    assert status(broken).startswith("script error")
