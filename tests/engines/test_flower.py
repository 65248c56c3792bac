"""The Flower engine: node identities, records in Context.state, the engine over a Grid, a real deployment."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from feddiff.config import ConfigError  # noqa: E402
from feddiff.engines.flower import apps  # noqa: E402
from feddiff.engines.flower.grid import HELLO, ROLLBACK, discover  # noqa: E402
from feddiff.engines.flower.local import write_app  # noqa: E402
from feddiff.engines.flower.node import decode_record, encode_record, node_identity  # noqa: E402
from feddiff.engines.runner import run  # noqa: E402
from feddiff.runs import RunDir  # noqa: E402

from tests.engines.test_simulator import final_weights  # noqa: E402


class FakeGrid:
    """A Grid whose nodes answer in this process through the ClientApp's own functions."""

    def __init__(self, node_configs: dict[int, dict], app_file, fail=lambda node, content: False,
                 tamper=lambda node, content, blob: blob):
        self.configs, self.app_file, self.fail, self.tamper = node_configs, app_file, fail, tamper
        self.states = {n: RecordDict() for n in node_configs}
        self.replies: dict[str, SimpleNamespace] = {}
        self.bytes_pushed = 0

    def get_node_ids(self):
        return list(self.configs)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node, mid = m.metadata.dst_node_id, f"m{len(self.replies)}-{id(m)}"
            error = None
            if m.metadata.message_type == HELLO:
                content = apps.hello_answer(self.configs[node], self.app_file)
            elif m.metadata.message_type == ROLLBACK:
                content = apps.rollback_answer(m.content, self.states[node])
            elif self.fail(node, m.content) == "gone":  # an error the SuperLink makes: from its own node id
                content, error = None, SimpleNamespace(code=5, reason="node unavailable")
                node = 1
            elif self.fail(node, m.content):
                content, error = None, SimpleNamespace(code=2, reason="<class 'RuntimeError'>:<'offline'>")
            else:
                self.bytes_pushed += len(m.content["feddiff"]["blob"])
                content = apps.client_answer(m.content, self.configs[node], self.states[node], self.app_file)
                content["feddiff"]["blob"] = self.tamper(node, m.content, content["feddiff"]["blob"])
            self.replies[mid] = SimpleNamespace(
                content=content, error=error, has_error=lambda e=error: e is not None,
                metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node))
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture
def task_identity():
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process has
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def nodes(k: int, **extra) -> dict[int, dict]:
    # Flower node ids are arbitrary: reversed here, so the partition id (not the order) decides the client
    return {1000 - i: {"partition-id": i, "num-partitions": k, **extra} for i in range(k)}


@pytest.mark.filterwarnings("ignore:pathological")
@pytest.mark.parametrize("sections", [
    {},
    {"algorithm": {"name": "scaffold"}, "train": {"optimizer": "sgd", "lr": 0.05},
     "compress": {"uplink": {"codec": "int8", "mode": "delta", "error_feedback": True}}},
    {"algorithm": {"name": "fedavg", "fraction": 0.5}, "prune": {"ratio": 0.5, "at": 1}},
    {"algorithm": {"name": "udec"}},  # personal models stay on the nodes
    {"dp": {"noise_multiplier": 0.8, "clip_norm": 0.5, "reproducible_noise": True}},  # the server's noise, seeded
    {"algorithm": {"name": "fedphd", "fraction": 0.5, "central_every": 2, "central_a": 500.0},
     "partition": {"num_clients": 4, "method": "pathological", "classes_per_client": 2},
     "ema": {"rule": "edge", "decay": 0.9}},  # edge EMAs synchronized through the edge-cloud link
    {"ema": {"rule": "client", "decay": 0.9, "warmup": True}},  # the EMA rides with the model both ways
])
def test_flower_engine_gives_the_simulators_weights_and_bytes(make_config, tmp_path, task_identity, sections,
                                                             monkeypatch):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 3}, eval={"grid_size": 0, "loss_num_samples": 0}, **sections)
    sim = run(cfg)
    app = write_app(tmp_path / "app", cfg, tmp_path / "flower-run")
    grid = FakeGrid(nodes(cfg.partition.num_clients), app / "feddiff_flower_app" / "feddiff_run.json")
    flower = RunDir.open(apps.server_main(grid, app / "feddiff_flower_app" / "feddiff_run.json"))
    a, b = final_weights(sim), final_weights(flower)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "ema" in sections:  # the EMA, not only the model it averages
        ea, eb = ({k: v for k, v in rd.latest_checkpoint()[1].items() if k.startswith("strategy/ema")}
                  for rd in (sim, flower))
        assert ea and ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    ms, mf = sim.read_metrics(), flower.read_metrics()
    training = [[{k: v for k, v in r["bytes"].items() if k != "eval"} for r in m] for m in (ms, mf)]
    assert training[0] == training[1]  # the same frames cross the same links
    assert [r["loss"] for r in ms] == [r["loss"] for r in mf]
    if "udec" in json.dumps(sections):  # personal models: asked from the nodes (eval link), evaluated, exported
        assert mf[-1]["bytes"]["eval"]["up"] > 0 and "eval" not in ms[-1]["bytes"]
        assert sorted(mf[-1]["eval"]["models"]) == sorted(ms[-1]["eval"]["models"]) == ["client0", "client1"]
        assert (flower.path / "models" / "client1" / "unet").is_dir()
    # the records live on the nodes: the server's checkpoint holds no client state
    assert not any(k.startswith("client/") for k in flower.latest_checkpoint()[1])
    if "scaffold" in json.dumps(sections):
        rec = decode_record(grid.states[1000]["feddiff-record"]["record"])
        assert any(k.startswith("ef/") for k in rec.tensors) and any(k.startswith("scaffold/") for k in rec.tensors)


def test_a_round_that_does_not_count_rolls_the_nodes_back(make_config, tmp_path, task_identity, monkeypatch):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 3}, eval={"grid_size": 0, "loss_num_samples": 0},
                      algorithm={"name": "scaffold"}, train={"optimizer": "sgd", "lr": 0.05}, faults={"min_replies": 2})
    finals, states = [], []
    for i, failing in enumerate(({999}, {999, 1000})):  # one node fails in round 2, or both
        app = write_app(tmp_path / f"app{i}", cfg, tmp_path / f"run{i}") / "feddiff_flower_app" / "feddiff_run.json"
        grid = FakeGrid(nodes(2), app, fail=lambda node, content, f=failing: node in f and content["feddiff"]["round"] == 1)
        rd = RunDir.open(apps.server_main(grid, app))
        finals.append(final_weights(rd))
        states.append({n: bytes(grid.states[n]["feddiff-record"]["record"]) for n in (999, 1000)})
        if i == 0:
            assert rd.read_metrics()[1]["round_policy"]["counted"] is False
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert states[0] == states[1]  # node 1000's round-2 update was undone on the node


def test_a_node_asked_twice_in_a_discarded_round_goes_back_to_before_the_round(make_config, tmp_path, task_identity,
                                                                          monkeypatch):
    # node 1000 trains, its reply is cut short (refused), it is asked again and answers; node 999 never
    # answers; the round is discarded: node 1000 must end as if round 2 never happened, not after its
    # first attempt
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 3}, eval={"grid_size": 0, "loss_num_samples": 0},
                      algorithm={"name": "scaffold"}, train={"optimizer": "sgd", "lr": 0.05},
                      faults={"policy": "reject", "retries": 1})
    states = []
    for i in range(2):
        app = write_app(tmp_path / f"app{i}", cfg, tmp_path / f"run{i}") / "feddiff_flower_app" / "feddiff_run.json"
        seen = []

        def tamper(node, content, blob, first=(i == 0)):
            if first and node == 1000 and content["feddiff"]["round"] == 1 and not seen:
                seen.append(1)
                return blob[: len(blob) // 2]
            return blob

        def fail(node, content, i=i):
            return content["feddiff"]["round"] == 1 and (node == 999 or i == 1)

        grid = FakeGrid(nodes(2), app, fail=fail, tamper=tamper)
        rd = RunDir.open(apps.server_main(grid, app))
        states.append({n: bytes(grid.states[n]["feddiff-record"]["record"]) for n in (999, 1000)})
        if i == 0:
            attempts = rd.read_metrics()[1]["round_policy"]["attempts"]
            assert "checksum" in " ".join(x["reason"] for x in attempts[0]["failed"])
    assert states[0] == states[1]


def test_a_node_that_fails_is_that_clients_failure(make_config, tmp_path, task_identity, monkeypatch):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 2}, eval={"grid_size": 0, "loss_num_samples": 0})
    app = write_app(tmp_path / "app", cfg, tmp_path / "flower-run") / "feddiff_flower_app" / "feddiff_run.json"
    def fail(node, content):
        return {(999, 0): True, (1000, 1): "gone"}.get((node, content["feddiff"]["round"]), False)

    grid = FakeGrid(nodes(2), app, fail=fail)
    m = RunDir.open(apps.server_main(grid, app)).read_metrics()
    assert m[0]["rejected"] == [{"id": 1, "reason": "Flower error 2: <class 'RuntimeError'>:<'offline'>"}]
    # the SuperLink's own error reply (sender: the SuperLink) is still client 0's failure
    assert m[1]["rejected"] == [{"id": 0, "reason": "Flower error 5: node unavailable"}]
    assert [c["id"] for c in m[1]["clients"]] == [1]
    from feddiff.engines.runner import resume
    from feddiff.runs import RunError

    with pytest.raises(RunError, match="was trained on FlowerEngine"):
        resume(tmp_path / "flower-run")


def test_malformed_and_oversized_replies_are_rejected_before_decoding(make_config, tmp_path, task_identity,
                                                                     monkeypatch):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 2}, eval={"grid_size": 0, "loss_num_samples": 0})
    app = write_app(tmp_path / "app", cfg, tmp_path / "flower-run") / "feddiff_flower_app" / "feddiff_run.json"

    def tamper(node, content, blob):
        if content["feddiff"]["round"] != 0:
            return blob
        if node == 999:  # one flipped byte in the payload
            return blob[:-9] + bytes([blob[-9] ^ 1]) + blob[-8:]
        return blob + bytes(3 << 20)  # 3 MiB of padding on a 0.66 MB model

    decoded = []
    import feddiff.compress.wire as wire

    real = wire.decode
    monkeypatch.setattr(wire, "decode", lambda b: (decoded.append(len(b)), real(b))[1])
    grid = FakeGrid(nodes(2), app, tamper=tamper)
    m = RunDir.open(apps.server_main(grid, app)).read_metrics()
    reasons = {r["id"]: r["reason"] for r in m[0]["rejected"]}
    assert "checksum mismatch" in reasons[1]
    assert reasons[0].startswith("rejected: a reply of ") and "exceeds this task's limit" in reasons[0]
    assert "skipped" in m[0] and decoded and not any(n > 3 << 20 for n in decoded)  # the oversized one was never parsed


def test_node_identities_and_edges_are_checked(make_config, tmp_path, task_identity):
    with pytest.raises(ConfigError, match="no 'partition-id'.*--node-config"):
        node_identity({"num-partitions": 2})
    with pytest.raises(ConfigError, match="partition-id=2 is not in 0..1"):
        node_identity({"partition-id": 2, "num-partitions": 2})
    with pytest.raises(ConfigError, match="quoted strings"):
        node_identity({"partition-id": 0, "num-partitions": 2, "edge-id": 3})
    cfg = make_config(partition={"num_clients": 4}, algorithm={"name": "hierfavg", "num_edges": 2})
    found = {p: {"node": 10 + p, "edge": "b" if p < 2 else "a"} for p in range(4)}
    got = apps.with_node_edges(cfg, found)
    assert got.algorithm.selection == "fixed" and got.algorithm.edge_of == [1, 1, 0, 0]  # edges sorted by name
    with pytest.raises(ConfigError, match="declare 1 edges"):
        apps.with_node_edges(cfg, {p: {"node": p, "edge": "a"} for p in range(4)})
    with pytest.raises(ConfigError, match="optimizer_scope"):
        apps.check_flower_config(make_config(train={"optimizer_scope": "shared"}))
    with pytest.raises(Exception, match="both hold partition-id=0"):
        discover(FakeGrid({1: {"partition-id": 0, "num-partitions": 2}, 2: {"partition-id": 0,
                                                                                 "num-partitions": 2}}, None), 2)


def own_data_folders(cfg, where: Path) -> list[Path]:
    """The simulator's partitions of ``cfg``, each written as a Fashion-MNIST folder of its own (a train split
    only, in the partition's order): what each institution of a real federation would hold."""
    from feddiff.data.sources import load_dataset, write_idx
    from feddiff.engines.experiment import partition_train

    train = load_dataset("fashion-mnist", cfg.data.root, "train")
    _, parts = partition_train(cfg, train.labels.numpy())
    folders = []
    for k, idx in enumerate(parts):
        folder = where / f"site-{k}"
        folder.mkdir(parents=True)
        write_idx(folder / "train-images-idx3-ubyte.gz", train.images[torch.from_numpy(idx)].squeeze(1).numpy())
        write_idx(folder / "train-labels-idx1-ubyte.gz", train.labels[torch.from_numpy(idx)].numpy())
        folders.append(folder)
    return folders


def server_without_training_data(cfg, where: Path):
    """``cfg`` whose data.root holds the test split only: a server that read a training image would fail."""
    where.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(Path(cfg.data.root) / name, where / name)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(where)})})


@pytest.mark.filterwarnings("ignore:pathological")
@pytest.mark.parametrize("sections", [
    {},
    {"algorithm": {"name": "fedphd", "fraction": 0.5, "central_every": 2, "central_a": 500.0},
     "partition": {"num_clients": 4, "method": "pathological", "classes_per_client": 2}},  # histograms asked
])
def test_nodes_with_their_own_data_train_like_the_simulator_and_the_server_reads_none(
        make_config, tmp_path, task_identity, monkeypatch, sections):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 2}, eval={"grid_size": 0, "loss_num_samples": 8}, **sections)
    sim = run(cfg)
    folders = own_data_folders(cfg, tmp_path / "sites")
    server_cfg = server_without_training_data(cfg, tmp_path / "server-data")
    app = write_app(tmp_path / "app", server_cfg, tmp_path / "flower-run", own_data=True) / "feddiff_flower_app" / \
        "feddiff_run.json"
    grid = FakeGrid({1000 - k: {"partition-id": k, "num-partitions": len(folders), "own-data": True,
                                "data-root": str(f)} for k, f in enumerate(folders)}, app)
    flower = RunDir.open(apps.server_main(grid, app))
    a, b = final_weights(sim), final_weights(flower)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ms, mf = sim.read_metrics(), flower.read_metrics()
    assert [r["bytes"] for r in ms] == [r["bytes"] for r in mf] and [r["loss"] for r in ms] == [r["loss"] for r in mf]
    got, want = (json.loads((rd.path / "partition.json").read_text()) for rd in (flower, sim))
    assert got["method"] == "own-data" and got["declared"] and got["sizes"] == want["sizes"]
    assert "indices" not in got and json.loads((flower.path / "manifest.json").read_text())["partition_hash"] == got["hash"]
    if sections:
        return
    # the run folder's tools work without the clients' data: evaluation on the server's own held-out split,
    # the report (its split named); those that need the clients' images say where they are
    from feddiff.engines.runner import evaluate_checkpoint, restored
    from feddiff.report.rows import summarize_run

    again = evaluate_checkpoint(flower.path, None, [])
    assert again["round"] == 2 and again["eval"]["heldout_loss"] == mf[-1]["eval"]["heldout_loss"]
    assert summarize_run(flower.path)["split"] == "own data (declared sizes)"
    with pytest.raises(Exception, match="trained by nodes on their own data, which is on the nodes"):
        restored(flower.path, [], "personalize", "feddiff personalize")
    with pytest.raises(Exception, match="trained by nodes on their own data: federated reference statistics need those nodes"):
        evaluate_checkpoint(flower.path, None, ["eval.federated_reference=true", "eval.fid_num_samples=4"])


def own_data_grid(cfg, tmp_path, opt_in: bool = True, **app_sections):
    """(FakeGrid of nodes with the simulator's partitions as their own data, app file of a data-less server)."""
    folders = own_data_folders(cfg, tmp_path / "sites")
    server_cfg = server_without_training_data(cfg, tmp_path / "server-data")
    app = write_app(tmp_path / "app", server_cfg, tmp_path / "flower-run", own_data=opt_in) / \
        "feddiff_flower_app" / "feddiff_run.json"
    return FakeGrid({1000 - k: {"partition-id": k, "num-partitions": len(folders), "own-data": True,
                                "data-root": str(f)} for k, f in enumerate(folders)}, app), app, folders


def test_a_server_without_training_data_says_what_fd_needs_before_round_1(make_config, tmp_path, task_identity,
                                                                          monkeypatch):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 1}, eval={"grid_size": 0, "loss_num_samples": 0, "fid_num_samples": 8})
    grid, app, _ = own_data_grid(cfg, tmp_path)
    with pytest.raises(ConfigError, match="FD/KID on the server needs a fashion-mnist train split of its own") as err:
        apps.server_main(grid, app)
    assert 'eval.feature_net = "inception"' in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    assert grid.bytes_pushed == 0  # before any round


def test_own_data_is_the_servers_choice_too(make_config, tmp_path, task_identity, monkeypatch):
    # nodes alone must not switch the server from partition counts to their own claims, nor the reverse
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(eval={"grid_size": 0, "loss_num_samples": 0})
    grid, app, _ = own_data_grid(cfg, tmp_path, opt_in=False)
    with pytest.raises(Exception, match="the nodes hold their own data .* not written for that"):
        apps.server_main(grid, app)
    shared = FakeGrid(nodes(2), app)
    app2 = write_app(tmp_path / "app2", cfg, tmp_path / "flower-run2", own_data=True) / "feddiff_flower_app" / \
        "feddiff_run.json"
    shared.app_file = app2
    with pytest.raises(Exception, match="written for nodes with their own data, but the nodes cut a shared dataset"):
        apps.server_main(shared, app2)


def test_the_servers_test_split_must_have_the_declared_channels(make_config, tmp_path):
    from feddiff.engines.experiment import DeclaredData, build_experiment

    cfg = make_config()
    with pytest.raises(ConfigError, match="declare 3-channel images; the server's test split has 1"):
        build_experiment(cfg, DeclaredData((200, 200), 3, tuple(str(c) for c in range(10))))


def test_own_data_is_declared_consistently(make_config, tmp_path, task_identity, monkeypatch):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    with pytest.raises(ConfigError, match="own-data=true needs data-root"):
        node_identity({"partition-id": 0, "num-partitions": 2, "own-data": True})
    with pytest.raises(ConfigError, match="'own-data' must be true or false, got 'yes'"):
        node_identity({"partition-id": 0, "num-partitions": 2, "own-data": "yes", "data-root": "/x"})
    own = {"own": True, "size": 5, "channels": 1, "classes": ("a", "b")}
    with pytest.raises(ConfigError, match=r"partitions \[0\] hold their own data .* and \[1\] cut a shared dataset"):
        apps.declared_data({0: {"node": 1, "edge": "", **own}, 1: {"node": 2, "edge": ""}})
    with pytest.raises(ConfigError, match=r"disagree on channels: \{0: 1, 1: 3\}"):
        apps.declared_data({0: {"node": 1, "edge": "", **own}, 1: {"node": 2, "edge": "", **own, "channels": 3}})
    with pytest.raises(ConfigError, match=r"disagree on classes: \{0: \('a', 'b'\), 1: \('b', 'c'\)\}"):
        apps.declared_data({0: {"node": 1, "edge": "", **own}, 1: {"node": 2, "edge": "", **own, "classes": ("b", "c")}})
    assert apps.declared_data({0: {"node": 1, "edge": ""}}) is None
    got = apps.declared_data({1: {"node": 2, "edge": "", **own, "size": 7}, 0: {"node": 1, "edge": "", **own}})
    assert got.sizes == (5, 7) and got.channels == 1  # in partition order

    cfg = make_config()
    folders = own_data_folders(cfg, tmp_path / "sites")
    app = write_app(tmp_path / "app", cfg, tmp_path / "flower-run") / "feddiff_flower_app" / "feddiff_run.json"
    confs = {1000 - k: {"partition-id": k, "num-partitions": 2, "own-data": True, "data-root": str(f)}
             for k, f in enumerate(folders)}
    found = discover(FakeGrid(confs, app), 2)  # the hello reads the node's data: its size, channels and classes
    sizes = [len(p) for p in json.loads((run(cfg).path / "partition.json").read_text())["indices"]]
    assert [found[k]["size"] for k in range(2)] == sizes and found[0]["channels"] == 1 and len(found[1]["classes"]) == 10
    (folders[1] / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(Exception, match="train-images-idx3-ubyte"):  # a node missing its data says which file
        discover(FakeGrid(confs, app), 2)
    def answering(**fields):
        base = {"partition-id": 0, "num-partitions": 1, "edge-id": "", "own-data": True, "num-examples": 5,
                "channels": 1, "class-names": ["a", "b"]}
        record = RecordDict({"feddiff": apps.ConfigRecord({k: v for k, v in {**base, **fields}.items() if v is not None})})
        monkeypatch.setattr(apps, "hello_answer", lambda conf, app_file=None: record)
        return FakeGrid({1: {"partition-id": 0, "num-partitions": 1}}, app)

    for fields, match in [({"num-examples": 0}, r"declares num-examples=0; expected an integer in \[1, 1000000000\]"),
                          ({"num-examples": True}, "declares num-examples=True"),
                          ({"channels": 9}, r"declares channels=9; expected an integer in \[1, 4\]"),
                          ({"class-names": None}, "holds its own data but did not say 'class-names'"),
                          ({"class-names": []}, "declares class-names=\\[\\]; expected a list of 1 to"),
                          ({"partition-id": 3}, r"partition-id=3, not in 0..0")]:
        with pytest.raises(Exception, match=match):
            discover(answering(**fields), 1)


def test_the_partition_cache_key_follows_the_data_folder(make_config, tmp_path, monkeypatch):
    from feddiff.data.sources import FASHION_MNIST_DIR
    from feddiff.engines.flower.node import data_folder, load_partition, partition_key

    assert data_folder(make_config(data={"root": ""})) == FASHION_MNIST_DIR  # the loader's default, not ""
    root = tmp_path / "data"
    shutil.copytree(make_config().data.root, root)
    cfg = make_config(data={"root": str(root)})
    monkeypatch.setenv("FEDDIFF_CACHE", str(root))  # the node's cache inside its data folder: not data
    key = partition_key(cfg, 0)
    load_partition(cfg, 0)
    assert any((root / "flower-partitions").iterdir()) and partition_key(cfg, 0) == key
    (root / "extra").mkdir()
    assert partition_key(cfg, 0) != key
    key = partition_key(cfg, 0)
    (root / "extra" / "more.png").write_bytes(b"x")  # a file added in a subfolder
    assert partition_key(cfg, 0) != key


def test_a_record_round_trips_through_context_state():
    from feddiff.client.runtime import ClientState

    st = ClientState(steps_done=7, optimizer={"w/exp_avg": torch.ones(3)}, personal={"w": torch.arange(4.0)},
                     tensors={"ef/w": torch.full((2,), 0.5)}, spec={"unet": {"a": 1}, "history": []})
    back = decode_record(encode_record(st))
    assert back.steps_done == 7 and back.spec == st.spec and torch.equal(back.personal["w"], torch.arange(4.0))
    assert torch.equal(back.tensors["ef/w"], st.tensors["ef/w"]) and decode_record(None).optimizer is None


def deployment_config(make_config):
    # one torch thread in every process (the nodes and this one): the same float reductions everywhere
    return make_config(run={"num_rounds": 2, "num_threads": 1}, partition={"num_clients": 3},
                       eval={"grid_size": 0, "loss_num_samples": 0})


def same_as_simulator(cfg, flower: RunDir) -> None:
    threads = torch.get_num_threads()
    try:
        sim = run(cfg)
    finally:
        torch.set_num_threads(threads)
    a, b = final_weights(sim), final_weights(flower)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["bytes"] for r in sim.read_metrics()] == [r["bytes"] for r in flower.read_metrics()]


def all_stopped(pids: list[int]) -> bool:
    import os

    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@pytest.mark.deployment
def test_a_real_local_deployment_trains_like_the_simulator(make_config, tmp_path):
    """SuperLink + 3 SuperNodes as real processes on loopback, `flwr run`: the simulator's weights and bytes."""
    from feddiff.engines.flower.local import run_local

    cfg = deployment_config(make_config)
    same_as_simulator(cfg, RunDir.open(run_local(cfg, tmp_path / "deployment", timeout_s=600)))
    assert (tmp_path / "deployment" / "logs" / "supernode-2.log").exists()
    # each node's warm worker answered its messages (2 rounds); the ClientApps did not fall back
    for k in range(3):
        assert (tmp_path / "deployment" / "logs" / f"worker-{k}.log").read_text().count("answered in") == 2
        assert "handles the message itself" not in (tmp_path / "deployment" / "logs" / f"supernode-{k}.log").read_text()


@pytest.mark.deployment
def test_a_real_deployment_of_nodes_with_their_own_data(make_config, tmp_path):
    """Each SuperNode with a folder of its own images (own-data=true), the server with no training image:
    the simulator's weights and bytes, when each folder holds the simulator's partition."""
    from feddiff.engines.flower.local import run_local

    cfg = deployment_config(make_config)
    folders = own_data_folders(cfg, tmp_path / "sites")
    server_cfg = server_without_training_data(cfg, tmp_path / "server-data")
    flower = RunDir.open(run_local(server_cfg, tmp_path / "deployment", timeout_s=600, own_data=folders))
    same_as_simulator(cfg, flower)
    assert json.loads((flower.path / "partition.json").read_text())["method"] == "own-data"


@pytest.mark.deployment
def test_tls_with_node_authentication_refuses_an_unregistered_node(make_config, tmp_path):
    from feddiff.engines.flower.local import LocalDeployment, node_config, write_app

    cfg = deployment_config(make_config)
    folder = tmp_path / "deployment"
    app = write_app(folder / "app", cfg, folder / "run")
    # (without warm workers: each message's ClientApp does the work itself, the other way a node runs)
    with LocalDeployment(folder, [node_config(k, 3) for k in range(3)], tls=True, auth=True, workers=False) as dep:
        rogue_key = dep.node_key("rogue", register=False)  # a key the SuperLink was never told about
        rogue = dep.start_node("rogue", node_config(0, 3), key=rogue_key)
        assert rogue.wait(120) != 0  # refused: it exits instead of joining
        assert "Failed to activate SuperNode" in (folder / "logs" / "supernode-rogue.log").read_text()
        dep.run(app, timeout_s=600)
        pids = dep.pids
    assert all_stopped(pids)
    same_as_simulator(cfg, RunDir.open(folder / "run"))


@pytest.mark.deployment
def test_every_process_is_stopped_when_the_run_fails(make_config, tmp_path):
    from feddiff.engines.flower.local import LocalDeployment, node_config, write_app
    from feddiff.runs import RunError

    cfg = deployment_config(make_config)
    folder = tmp_path / "deployment"
    # node 2 says it holds partition 1 too: the ServerApp stops before round 1
    confs = [node_config(0, 3), node_config(1, 3), node_config(1, 3)]
    app = write_app(folder / "app", cfg, folder / "run")
    pids = []
    with pytest.raises(RunError):
        with LocalDeployment(folder, confs) as dep:
            pids = dep.pids
            dep.run(app, timeout_s=300)
            raise RunError("the run should have failed")  # whichever way: the with block must clean up
    assert pids and all_stopped(pids)
    assert "both hold partition-id=1" in (folder / "logs" / "flwr-run.log").read_text()


def test_a_superlink_off_loopback_needs_tls():
    from feddiff.engines.flower.local import check_transport
    from feddiff.runs import RunError

    check_transport("127.0.0.1", tls=False, auth=False, allow_insecure=False)
    check_transport("10.0.0.5", tls=True, auth=True, allow_insecure=False)
    check_transport("10.0.0.5", tls=False, auth=False, allow_insecure=True)
    with pytest.raises(RunError, match="without TLS would carry models in clear text"):
        check_transport("0.0.0.0", tls=False, auth=False, allow_insecure=False)
    with pytest.raises(RunError, match="authentication needs TLS"):
        check_transport("127.0.0.1", tls=False, auth=True, allow_insecure=True)


# --- warm workers: the ClientApp hands each message to a process that keeps the client between messages ---


@pytest.fixture
def worker_at():
    """Start Workers serving on a thread each, at short private socket paths; stopped at the end."""
    import tempfile
    import threading

    from feddiff.engines.flower.worker import Worker

    folder, started = Path(tempfile.mkdtemp(prefix="fdw-")), []

    def start(name: str = "0", slots: int | None = None) -> tuple[str, Worker]:
        worker = Worker(folder / f"{name}.sock", slots)
        stop = threading.Event()
        thread = threading.Thread(target=worker.serve, kwargs={"stop": stop}, daemon=True)
        thread.start()
        started.append((stop, thread))
        return str(worker.path), worker

    yield start
    for stop, thread in started:
        stop.set()
        thread.join(10)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("sections", [
    {},
    {"algorithm": {"name": "scaffold"}, "train": {"optimizer": "sgd", "lr": 0.05},
     "compress": {"uplink": {"codec": "int8", "mode": "delta", "error_feedback": True}}},
])
def test_nodes_with_workers_give_the_simulators_weights(make_config, tmp_path, task_identity, sections, monkeypatch,
                                                        worker_at):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 2}, eval={"grid_size": 0, "loss_num_samples": 0}, **sections)
    sim = run(cfg)
    app = write_app(tmp_path / "app", cfg, tmp_path / "flower-run") / "feddiff_flower_app" / "feddiff_run.json"
    workers = [worker_at(str(i)) for i in range(cfg.partition.num_clients)]
    configs = {node: {**conf, "worker": workers[conf["partition-id"]][0]}
               for node, conf in nodes(cfg.partition.num_clients).items()}
    flower = RunDir.open(apps.server_main(FakeGrid(configs, app), app))
    a, b = final_weights(sim), final_weights(flower)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["bytes"] for r in sim.read_metrics()] == [r["bytes"] for r in flower.read_metrics()]
    assert all(len(w.sessions) == 1 for _, w in workers)  # each worker built its client once, and answered


def test_a_worker_reports_its_errors_and_a_missing_one_is_done_without(make_config, tmp_path, task_identity,
                                                                      monkeypatch, worker_at, capsys):
    from feddiff.compress.wire import MessageError
    from feddiff.engines.flower.worker import WorkerError, call

    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 1}, eval={"grid_size": 0, "loss_num_samples": 0})
    app = write_app(tmp_path / "app", cfg, tmp_path / "flower-run") / "feddiff_flower_app" / "feddiff_run.json"
    path, worker = worker_at()
    with pytest.raises(WorkerError, match="MessageError: not a feddiff message"):
        call(path, str(app), {"partition-id": 0, "num-partitions": 2}, b"junk", None)
    with pytest.raises(WorkerError, match="ConfigError: .*partition.num_clients=2"):
        call(path, str(app), {"partition-id": 0, "num-partitions": 3}, b"junk", None)
    # through the ClientApp: after the worker's failure, its own: the error a node without a worker reports
    with pytest.raises(MessageError, match="not a feddiff message"):
        apps.handle_message(app, {"partition-id": 0, "num-partitions": 2, "worker": path}, b"junk", None)
    assert "the node's worker: MessageError" in capsys.readouterr().err
    # a node whose worker is not there: its ClientApp handles the messages itself, with the same result
    sim = run(cfg)
    gone = {node: {**conf, "worker": str(Path(path).with_name("nobody.sock"))} for node, conf in nodes(2).items()}
    flower = RunDir.open(apps.server_main(FakeGrid(gone, app), app))
    a, b = final_weights(sim), final_weights(flower)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "this ClientApp handles the message itself" in capsys.readouterr().err


def test_a_worker_that_is_busy_gone_or_of_another_version_is_done_without(tmp_path, monkeypatch, worker_at):
    import socket
    import tempfile
    import threading

    from feddiff.engines.flower import worker as w

    folder = Path(tempfile.mkdtemp(prefix="fdw-"))
    try:
        for behaviour in ("silent", "takes then dies"):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(folder / f"{len(behaviour)}.sock"))
            server.listen(1)

            def fake(server=server, behaviour=behaviour):
                conn, _ = server.accept()
                with conn:
                    w._receive(conn, 2)
                    if behaviour == "silent":  # busy with another message: never says it took this one
                        time.sleep(1.0)
                    else:  # took it, then went away (killed mid-training)
                        w._send(conn, {"taken": True}, [])

            thread = threading.Thread(target=fake, daemon=True)
            thread.start()
            monkeypatch.setattr(w, "ACCEPT_S", 0.3)
            with pytest.raises(w.WorkerUnavailable, match="did not answer|did not take"):
                w.call(str(folder / f"{len(behaviour)}.sock"), "app.json", {}, b"x", None)
            thread.join(5)
            server.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    path, worker = worker_at()
    worker.versions()  # what the worker runs, fixed when it starts
    monkeypatch.setattr(w, "_versions", lambda: {"feddiff": "9.9", "torch": "0.1"})  # the ClientApp: upgraded since
    with pytest.raises(w.WorkerError, match="the ClientApp runs .*9.9.* restart it"):
        w.call(path, str(tmp_path / "app.json"), {"partition-id": 0, "num-partitions": 2}, b"x", None)


def test_one_worker_serves_runs_with_their_own_settings(make_config, tmp_path, task_identity, monkeypatch,
                                                        worker_at):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    from feddiff.engines.flower.node import NodeSession

    default = torch.get_num_threads()
    seen = []  # torch's threads where the worker trains (thread-local in OpenMP: observed there)
    handle = NodeSession.handle
    monkeypatch.setattr(NodeSession, "handle", lambda self, *a: (seen.append(torch.get_num_threads()),
                                                                 handle(self, *a))[1])
    path, worker = worker_at()
    finals = []
    try:
        for name, threads in (("one-thread", 1), ("default", 0), ("one-thread", 1)):  # (0: torch's default)
            cfg = make_config(run={"num_rounds": 1, "num_threads": threads, "name": name},
                              eval={"grid_size": 0, "loss_num_samples": 0})
            app = write_app(tmp_path / name, cfg, tmp_path / f"flower-{name}-{len(finals)}")
            app = app / "feddiff_flower_app" / "feddiff_run.json"
            configs = {node: {**conf, "worker": path} for node, conf in nodes(2).items()}
            finals.append(final_weights(RunDir.open(apps.server_main(FakeGrid(configs, app), app))))
            assert seen[-2:] == [threads or default] * 2  # set for each message, not once per worker
    finally:
        torch.set_num_threads(default)  # (the worker runs in this process: its settings are this test's)
    # the third run rewrote the first's app file: its clients are new ones, not the first run's
    first = os.path.realpath(tmp_path / "one-thread" / "feddiff_flower_app" / "feddiff_run.json")
    stamps = [key[1] for key in worker.sessions if key[0] == first]
    assert stamps == [os.stat(first).st_mtime_ns] * 2
    assert all(torch.equal(finals[0][k], finals[2][k]) for k in finals[0])


def test_a_worker_socket_is_private_and_its_exchanges_bounded(tmp_path):
    import os
    import socket
    import stat

    from feddiff.engines.flower.worker import MAX_HEADER, Worker

    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(PermissionError, match="no one else can enter.*mode 755"):
        Worker(open_dir / "w.sock")
    (tmp_path / "private-file").mkdir(mode=0o700)
    notes = tmp_path / "private-file" / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a socket"):  # a mistyped --socket deletes nothing
        Worker(notes)
    assert notes.read_text() == "keep me"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    w = Worker(private / "w.sock")
    assert stat.S_IMODE(os.stat(w.path).st_mode) == 0o600
    with pytest.raises(RuntimeError, match="another worker serves"):
        Worker(w.path)
    w.sock.close()  # died without cleaning up: the stale socket is replaced
    w = Worker(w.path)
    a, b = socket.socketpair(socket.AF_UNIX)
    a.sendall((MAX_HEADER + 1).to_bytes(8, "little"))
    with pytest.raises(ConnectionError, match="not a feddiff worker exchange"):
        w.answer(b)
    a.close(), b.close(), w.close()
    assert not w.path.exists()


def test_nothing_is_sent_after_the_last_byte_the_worker_reads():
    # the worker answers as soon as it has read a message, and may close before a zero-length send
    # of an empty record: that send failed with EPIPE, and the ClientApp took it for a lost worker
    from feddiff.engines.flower.worker import _receive, _send

    class Recorder:
        def __init__(self):
            self.sent = []

        def sendall(self, data):
            self.sent.append(bytes(data))

    r = Recorder()
    _send(r, {"k": 1}, [b"junk", b""])
    assert all(r.sent) and b"".join(r.sent)[-8:] == bytes(8)  # the empty record: its length, and nothing after

    import socket

    a, b = socket.socketpair(socket.AF_UNIX)
    a.sendall(b"".join(r.sent))
    assert _receive(b, 2) == ({"k": 1}, [b"junk", b""])
    a.close(), b.close()


def test_workers_sharing_a_machine_take_turns(tmp_path):
    import threading

    from feddiff.engines.flower.worker import Slots

    slots, events = Slots(tmp_path, 1), []
    first_in, release = threading.Event(), threading.Event()

    def first():
        with slots.held():
            events.append("first in")
            first_in.set()
            release.wait(10)
            events.append("first out")

    def second():
        first_in.wait(10)
        with slots.held():
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_in.wait(10)
    time.sleep(0.2)  # the second is waiting now
    assert events == ["first in"]
    release.set()
    for t in threads:
        t.join(10)
    assert events == ["first in", "first out", "second in"]
    with Slots(tmp_path, 2).held():  # two slots: a second holder does not wait for the first
        done = threading.Event()

        def other():
            with Slots(tmp_path, 2).held():
                done.set()

        t = threading.Thread(target=other)
        t.start()
        assert done.wait(5)
        t.join(5)
