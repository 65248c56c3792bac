"""The Flower engine: node identities, records in Context.state, the engine over a Grid, a real deployment."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from feddiff.config import ConfigError  # noqa: E402
from feddiff.engines.flower import apps  # noqa: E402
from feddiff.engines.flower.grid import HELLO, discover  # noqa: E402
from feddiff.engines.flower.local import write_app  # noqa: E402
from feddiff.engines.flower.node import decode_record, encode_record, node_identity  # noqa: E402
from feddiff.engines.runner import run  # noqa: E402
from feddiff.runs import RunDir  # noqa: E402
from feddiff.types import under  # noqa: E402

from tests.engines.test_simulator import final_weights  # noqa: E402


class FakeGrid:
    """A Grid whose nodes answer in this process through the ClientApp's own functions."""

    def __init__(self, node_configs: dict[int, dict], app_file, fail=lambda node, content: False):
        self.configs, self.app_file, self.fail = node_configs, app_file, fail
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
                content = apps.hello_answer(self.configs[node])
            elif self.fail(node, m.content):
                content, error = None, SimpleNamespace(code=2, reason="<class 'RuntimeError'>:<'offline'>")
            else:
                self.bytes_pushed += len(m.content["feddiff"]["blob"])
                content = apps.client_answer(m.content, self.configs[node], self.states[node], self.app_file)
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


@pytest.mark.parametrize("sections", [
    {},
    {"algorithm": {"name": "scaffold"}, "train": {"optimizer": "sgd", "lr": 0.05},
     "compress": {"uplink": {"codec": "int8", "mode": "delta", "error_feedback": True}}},
    {"algorithm": {"name": "fedavg", "fraction": 0.5}, "prune": {"ratio": 0.5, "at": 1}},
])
def test_flower_engine_gives_the_simulators_weights_and_bytes(make_config, tmp_path, task_identity, sections,
                                                             monkeypatch):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 3}, eval={"grid_size": 0, "loss_num_samples": 0}, **sections)
    sim = run(cfg)
    app = write_app(tmp_path / "app", cfg, tmp_path / "flower-run")
    grid = FakeGrid(nodes(2), app / "feddiff_flower_app" / "feddiff_run.json")
    flower = RunDir.open(apps.server_main(grid, app / "feddiff_flower_app" / "feddiff_run.json"))
    a, b = final_weights(sim), final_weights(flower)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ms, mf = sim.read_metrics(), flower.read_metrics()
    assert [r["bytes"] for r in ms] == [r["bytes"] for r in mf]  # the same frames cross the same links
    assert [r["loss"] for r in ms] == [r["loss"] for r in mf]
    # the records live on the nodes: the server's checkpoint holds no client state
    assert not any(k.startswith("client/") for k in flower.latest_checkpoint()[1])
    if "scaffold" in json.dumps(sections):
        rec = decode_record(grid.states[1000]["feddiff-record"]["record"])
        assert any(k.startswith("ef/") for k in rec.tensors) and any(k.startswith("scaffold/") for k in rec.tensors)


def test_a_node_that_fails_is_that_clients_failure(make_config, tmp_path, task_identity, monkeypatch):
    monkeypatch.setenv("FEDDIFF_CACHE", str(tmp_path / "node-cache"))
    cfg = make_config(run={"num_rounds": 2}, eval={"grid_size": 0, "loss_num_samples": 0})
    app = write_app(tmp_path / "app", cfg, tmp_path / "flower-run") / "feddiff_flower_app" / "feddiff_run.json"
    grid = FakeGrid(nodes(2), app, fail=lambda node, content: node == 999 and content["feddiff"]["round"] == 0)
    m = RunDir.open(apps.server_main(grid, app)).read_metrics()
    assert m[0]["rejected"] == [{"id": 1, "reason": "Flower error 2: <class 'RuntimeError'>:<'offline'>"}]
    assert [c["id"] for c in m[1]["clients"]] == [0, 1]


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


def test_a_record_round_trips_through_context_state():
    from feddiff.client.runtime import ClientState

    st = ClientState(steps_done=7, optimizer={"w/exp_avg": torch.ones(3)}, personal={"w": torch.arange(4.0)},
                     tensors={"ef/w": torch.full((2,), 0.5)}, spec={"unet": {"a": 1}, "history": []})
    back = decode_record(encode_record(st))
    assert back.steps_done == 7 and back.spec == st.spec and torch.equal(back.personal["w"], torch.arange(4.0))
    assert torch.equal(back.tensors["ef/w"], st.tensors["ef/w"]) and decode_record(None).optimizer is None


def test_a_real_local_deployment_trains_like_the_simulator(make_config, tmp_path):
    """SuperLink + 2 SuperNodes as real processes on loopback, `flwr run`: the simulator's weights and bytes."""
    from feddiff.engines.flower.local import run_local

    cfg = make_config(run={"num_rounds": 2}, eval={"grid_size": 0, "loss_num_samples": 0},
                      algorithm={"name": "scaffold"}, train={"optimizer": "sgd", "lr": 0.05})
    sim = run(cfg)
    flower = RunDir.open(run_local(cfg, tmp_path / "deployment", timeout_s=600))
    a, b = final_weights(sim), final_weights(flower)
    # other processes: torch's thread count may differ, so equal to float tolerance (DESIGN's bar)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    ms, mf = sim.read_metrics(), flower.read_metrics()
    assert [r["bytes"] for r in ms] == [r["bytes"] for r in mf]
    assert (tmp_path / "deployment" / "logs" / "supernode-1.log").exists()
    assert not (tmp_path / "deployment" / "flwr" / "cli" / ".flwr").exists()
