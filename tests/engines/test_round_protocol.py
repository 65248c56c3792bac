"""The round protocol (issue 9): an open client side, the loop written once, rejections, setup queries."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch

from feddiff.algorithms import ALGORITHMS, Algorithm, ClientHook, Reply, Task, Transfer, register
from feddiff.algorithms.fedavg import FedAvg
from feddiff.client.node import ClientNode
from feddiff.client.runtime import ClientState
from feddiff.client.train import LocalTerm
from feddiff.compress.link import ClientLink
from feddiff.config import AlgorithmConfig, F
from feddiff.engines.loop import Incoming
from feddiff.engines.runner import resume, run
from feddiff.engines.simulator import Simulator, SimulatorEngine
from feddiff.engines.experiment import build_experiment
from feddiff.model.spec import build_model
from feddiff.runs import RunDir, RunError

from tests.engines.test_simulator import final_weights


# -- a toy algorithm, written here only: one extra tensor each way and a term in the local loss -----------
class ToyConfig(AlgorithmConfig):
    """FedAvg plus a pull of every weight toward a scalar the server sends."""

    name: Literal["toy"] = F("toy", "algorithm: toy")
    weight: float = F(0.5, "strength of the toy loss term", ge=0)


class ToyTerm(LocalTerm):
    def __init__(self, target: float, weight: float):
        self.target, self.weight, self.calls = target, weight, 0

    def loss(self, model):
        self.calls += 1
        first = next(model.parameters())
        return self.weight * ((first - self.target) ** 2).mean()

    def metrics(self):
        return {"toy_calls": float(self.calls)}


class ToyClient(ClientHook):
    config_keys = frozenset({"toy_weight"})

    def terms(self, task, state):
        return [ToyTerm(float(task.extras["target"]), float(task.config["toy_weight"]))]

    def reply_extras(self, task, state, trained, result):
        seen = state.tensors.get("toy/rounds", torch.zeros(()))
        state.tensors["toy/rounds"] = seen + 1  # client state that lives in its record
        return {"echo": task.extras["target"] * 2, "rounds": state.tensors["toy/rounds"].clone()}


class Toy(FedAvg):
    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.echoes: list[float] = []

    def configure(self, rnd):
        return [Task(c, self.global_model, {"round": rnd, "upload": "all", "toy_weight": self.cfg.weight},
                     extras={"target": torch.tensor(float(rnd + 1))}) for c in self.sample_clients(rnd)]

    def aggregate(self, rnd, replies, failures=()):
        self.echoes += [float(r.extras["echo"]) for r in replies]
        metrics = super().aggregate(rnd, replies, failures)
        return {**metrics, "echo_sum": sum(float(r.extras["echo"]) for r in replies),
                "client_rounds": sum(float(r.extras["rounds"]) for r in replies)}


@pytest.fixture
def toy_registered():
    register(Algorithm("toy", ToyConfig, Toy, ToyClient))
    yield
    ALGORITHMS.pop("toy", None)


def test_a_toy_algorithm_runs_end_to_end_with_no_change_outside_its_code(make_config, toy_registered):
    rd = run(make_config(algorithm={"name": "toy", "weight": 0.5}))
    metrics = rd.read_metrics()
    # the server's extra reached both clients and came back doubled: 2 * (rnd + 1) per client
    assert [m["echo_sum"] for m in metrics] == [4.0, 8.0]
    assert [m["client_rounds"] for m in metrics] == [2.0, 4.0]  # client state kept between rounds
    assert all(c["toy_calls"] == 2.0 for m in metrics for c in m["clients"])  # the term ran every step
    # the term changed the training: not the FedAvg result
    plain = run(make_config())
    a, b = final_weights(rd), final_weights(plain)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    # the extras were counted: each downlink carries the target scalar on top of the model
    assert json.loads((rd.path / "config.json").read_text())["algorithm"] == {
        "name": "toy", "fraction": 1.0, "min_clients": 1, "weight": 0.5}


def test_a_toy_algorithm_resumes_exactly(make_config, toy_registered):
    full = run(make_config(algorithm={"name": "toy"}, run={"num_rounds": 3}))
    part = run(make_config(algorithm={"name": "toy"}, run={"num_rounds": 1}))
    resume(part.path, ["run.num_rounds=3"])
    a, b = final_weights(full), final_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert part.read_metrics()[-1]["client_rounds"] == full.read_metrics()[-1]["client_rounds"] == 6.0


def test_unknown_algorithm_lists_the_registered_ones(make_config, toy_registered):
    from feddiff.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown algorithm 'nope'.*'toy'"):
        make_config(algorithm={"name": "nope"})
    with pytest.raises(ConfigError, match=r"algorithm.weight"):
        make_config(algorithm={"name": "toy", "weight": -1})


# -- the loop written once: a different engine gets the same weights ----------------------------------
class ProcessLikeEngine(SimulatorEngine):
    """Runs clients in reverse order, each from its serialised record, with a fresh node (own model)."""

    def __init__(self, exp):
        super().__init__(exp)
        self.records = {k: st.to_flat() for k, st in enumerate(self.clients)}

    def send_and_receive(self, rnd, messages, events):
        out = []
        for m in reversed(messages):
            flat, meta = self.records[m.client]
            state = ClientState.from_flat({k: v.clone() for k, v in flat.items()}, json.loads(json.dumps(meta)))
            exp = self.exp
            models = {}  # a process of its own: its own working model, built with another init seed

            def model_for(spec):
                return models.setdefault(spec.id, build_model(spec, 99))

            runtime = type(exp.runtime)(
                model_for, exp.runtime.base_spec, exp.scheduler, exp.runtime.spec, exp.runtime.seed, exp.runtime.hook,
                exp.runtime.keep_optimizer_state, exp.runtime.num_rounds, exp.runtime.lr_schedule,
                exp.runtime.min_lr_ratio)
            node = ClientNode(runtime, ClientLink(exp.links, exp.cfg.run.seed))
            blob = node.handle(m.client, bytes(m.blob), state, exp.client_data[m.client])
            self.records[m.client] = state.to_flat()
            self.clients[m.client] = state
            inc = Incoming(m.client, blob)
            events.done(inc)
            out.append(inc)
        return out


@pytest.mark.parametrize("algorithm,compress", [
    ("fedavg", {}),
    ("udec", {"uplink": {"codec": "int8", "mode": "delta", "error_feedback": True},
              "downlink": {"codec": "int8", "mode": "delta"}}),
])
def test_the_shared_loop_over_another_engine_gives_the_simulators_weights(make_config, algorithm, compress):
    cfg = make_config(algorithm={"name": algorithm}, compress=compress, model={"dropout": 0.1},
                      eval={"grid_size": 0, "loss_num_samples": 0})
    expected = run(cfg)
    sim = Simulator(build_experiment(cfg), RunDir.create(cfg.run.out_dir, "other"))
    sim.engine = ProcessLikeEngine(sim.exp)
    sim.initialize()
    got = sim.run()
    a, b = final_weights(expected), final_weights(got)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in ("client/0/personal/conv_in.weight", "client/1/tensors/ef/up_blocks.0.resnets.0.conv1.weight"):
        ta, tb = (RunDir(p).latest_checkpoint()[1] for p in (expected.path, got.path))
        if k in ta:
            assert torch.equal(ta[k], tb[k]), k


# -- failing and bad replies are rejections, not the end of the run ---------------------------------
class FaultyEngine(SimulatorEngine):
    def __init__(self, exp, fault):
        super().__init__(exp)
        self.fault = fault

    def send_and_receive(self, rnd, messages, events):
        replies = super().send_and_receive(rnd, messages, events)
        return [self.fault(rnd, inc) for inc in replies]


def _run_with(make_config, fault, **sections):
    cfg = make_config(eval={"grid_size": 0, "loss_num_samples": 0}, **sections)
    sim = Simulator(build_experiment(cfg), RunDir.create(cfg.run.out_dir, "faulty"))
    sim.engine = FaultyEngine(sim.exp, fault)
    sim.initialize()
    return sim, sim.run()


def _poisoned(blob: bytes, value: float) -> bytes:
    from feddiff.compress import wire

    msg = wire.decode(blob)
    key = next(iter(msg.tensors))
    msg.tensors[key] = torch.full_like(msg.tensors[key], value)
    return wire.encode(msg)


def test_a_raising_client_is_recorded_and_the_round_completes(make_config):
    class Boom(SimulatorEngine):
        def send_and_receive(self, rnd, messages, events):
            self.node.runtime.hook = _RaiseFor(client=1, rnd=0)
            return super().send_and_receive(rnd, messages, events)

    cfg = make_config(eval={"grid_size": 0, "loss_num_samples": 0})
    sim = Simulator(build_experiment(cfg), RunDir.create(cfg.run.out_dir, "boom"))
    sim.engine = Boom(sim.exp)
    sim.initialize()
    rd = sim.run()
    first, second = rd.read_metrics()
    assert first["rejected"] == [{"id": 1, "reason": "RuntimeError: client 1 fails in round 0"}]
    assert [c["id"] for c in first["clients"]] == [0] and "rejected" not in second


class _RaiseFor(ClientHook):
    def __init__(self, client, rnd):
        super().__init__(None)
        self.client, self.rnd = client, rnd

    def terms(self, task, state):
        if task.client == self.client and task.config["round"] == self.rnd:
            raise RuntimeError(f"client {self.client} fails in round {self.rnd}")
        return []


@pytest.mark.parametrize("value,reason", [(float("nan"), "non-finite"), (float("inf"), "non-finite")])
def test_non_finite_replies_are_rejected_and_never_reach_the_model(make_config, value, reason):
    def fault(rnd, inc):
        return Incoming(inc.client, _poisoned(inc.blob, value)) if inc.client == 0 else inc

    sim, rd = _run_with(make_config, fault)
    m = rd.read_metrics()
    assert all(r["rejected"][0]["id"] == 0 and reason in r["rejected"][0]["reason"] for r in m)
    weights = final_weights(rd)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_wrong_shape_and_truncated_replies_are_rejected(make_config):
    from feddiff.compress import wire

    def fault(rnd, inc):
        if inc.client == 0:
            return Incoming(inc.client, inc.blob[: len(inc.blob) // 2])
        msg = wire.decode(inc.blob)
        key = next(iter(msg.tensors))
        msg.tensors[key] = torch.zeros(3)
        return Incoming(inc.client, wire.encode(msg))

    sim, rd = _run_with(make_config, fault)
    first = rd.read_metrics()[0]
    reasons = {r["id"]: r["reason"] for r in first["rejected"]}
    assert "undecodable" in reasons[0] and "shape [3]" in reasons[1]
    assert first["skipped"] and first["loss"] is None and first["clients"] == []
    # nothing arrived: the global model is the initial one
    from feddiff.seeding import derive_seed

    fresh = build_model(sim.exp.spec, derive_seed(sim.cfg.run.seed, "model-init")).state_dict()
    w = final_weights(rd)
    assert all(torch.equal(w[f"strategy/global/{k}"], v) for k, v in fresh.items())


def test_aggregation_weights_are_the_partitions_not_the_claims(make_config):
    from feddiff.compress import wire

    def fault(rnd, inc):
        msg = wire.decode(inc.blob)
        msg.meta["num_samples"] = 10**6 if inc.client == 0 else msg.meta["num_samples"]
        return Incoming(inc.client, wire.encode(msg))

    sim, rd = _run_with(make_config, fault)
    rows = {c["id"]: c for c in rd.read_metrics()[0]["clients"]}
    sizes = json.loads((rd.path / "partition.json").read_text())["sizes"]
    assert rows[0]["num_samples"] == sizes[0] and rows[0]["claimed_samples"] == 10**6
    assert rows[1]["num_samples"] == sizes[1] and "claimed_samples" not in rows[1]


def test_validator_by_hand():
    from feddiff.engines.validate import validate_reply

    expected = {"a": torch.zeros(2), "b": torch.zeros(1, dtype=torch.float64)}
    loss = {"loss": 0.5}
    ok = Reply(0, {"a": torch.ones(2), "b": torch.ones(1, dtype=torch.float64)}, 5, loss)
    assert validate_reply(ok, expected) is None
    assert "missing 1" in validate_reply(Reply(0, {"a": torch.ones(2)}, 5, loss), expected)
    assert "unexpected" in validate_reply(Reply(0, {**ok.tensors, "c": torch.ones(1)}, 5, loss), expected)
    assert "dtype" in validate_reply(Reply(0, {"a": torch.ones(2), "b": torch.ones(1)}, 5, loss), expected)
    assert "num_samples 0" in validate_reply(Reply(0, ok.tensors, 0, loss), expected)
    assert "extra e: non-finite" in validate_reply(
        Reply(0, ok.tensors, 5, loss, extras={"e": torch.tensor([float("nan")])}), expected)
    assert "extra e: shape [2]" in validate_reply(
        Reply(0, ok.tensors, 5, loss, extras={"e": torch.zeros(2)}), expected, None, {"e": torch.zeros(3)})
    assert "missing 1 extra" in validate_reply(Reply(0, ok.tensors, 5, loss), expected, None, {"e": torch.zeros(3)})
    assert "no 'loss'" in validate_reply(Reply(0, ok.tensors, 5), expected)


# -- setup queries: label histograms for strategies that declare they need them --------------------------
class NeedsLabels(FedAvg):
    needs = ("label_histogram",)


class NeedsConfig(AlgorithmConfig):
    name: Literal["needs-labels"] = F("needs-labels", "algorithm: needs-labels")


def test_label_histograms_are_disclosed_counted_and_not_asked_again_on_resume(make_config):
    register(Algorithm("needs-labels", NeedsConfig, NeedsLabels))
    try:
        cfg = make_config(algorithm={"name": "needs-labels"}, run={"num_rounds": 1})
        exp = build_experiment(cfg)
        sim = Simulator(exp, RunDir.create(cfg.run.out_dir, "labels"))
        sim.initialize()
        rd = sim.run()
        hist = json.loads((rd.path / "partition.json").read_text())["label_histograms"]
        got = {k: v["label_histogram"].tolist() for k, v in exp.strategy.client_info.items()}
        assert got == dict(enumerate(hist))
        first = rd.read_metrics()[0]
        assert first["bytes_setup"]["client-server"]["up"] > 0
        # round 1's own bytes exclude the setup; the cumulative count includes it
        assert first["bytes_cumulative"]["client-server"]["up"] == (
            first["bytes"]["client-server"]["up"] + first["bytes_setup"]["client-server"]["up"])
        resume(rd.path, ["run.num_rounds=2"])
        assert "bytes_setup" not in rd.read_metrics()[-1]
    finally:
        ALGORITHMS.pop("needs-labels", None)


# -- exchanges between server tiers go through the links and the ledger ----------------------------------
class TwoTier(FedAvg):
    def exchange(self, rnd, arrived):
        if not arrived:
            return [Transfer("edge0", "cloud", "edge-cloud", {"w": self.global_model["conv_in.weight"]})]
        if arrived[0].dst == "cloud":
            self.got = arrived[0].tensors["w"]
            return [Transfer("cloud", "edge0", "edge-cloud", {"w": self.got}, direction="down")]
        return []


class TwoTierConfig(AlgorithmConfig):
    name: Literal["two-tier"] = F("two-tier", "algorithm: two-tier")


def test_exchanges_between_server_tiers_are_encoded_and_counted(make_config):
    register(Algorithm("two-tier", TwoTierConfig, TwoTier))
    try:
        cfg = make_config(algorithm={"name": "two-tier"}, run={"num_rounds": 1},
                          compress={"uplink": {"codec": "fp16"}})
        exp = build_experiment(cfg)
        sim = Simulator(exp, RunDir.create(cfg.run.out_dir, "tiers"))
        sim.initialize()
        rd = sim.run()
        b = rd.read_metrics()[0]["bytes"]["edge-cloud"]
        n = exp.strategy.global_model["conv_in.weight"].numel()
        assert 2 * n < b["up"] < 2 * n + 1000 and 4 * n < b["down"] < 4 * n + 1000  # fp16 up, fp32 down
        assert exp.strategy.got.dtype == torch.float32
    finally:
        ALGORITHMS.pop("two-tier", None)


# -- resume refuses changed data -----------------------------------------------------------------------
def test_resume_refuses_a_changed_partition(make_config):
    rd = run(make_config(run={"num_rounds": 1}))
    part = json.loads((rd.path / "partition.json").read_text())
    part["hash"] = "0" * 64
    (rd.path / "partition.json").write_text(json.dumps(part))
    with pytest.raises(RunError, match="partition.json"):
        resume(rd.path, ["run.num_rounds=2"])


# -- review findings ------------------------------------------------------------------------------------
def test_resume_keeps_the_disclosed_histograms(make_config):
    register(Algorithm("needs-labels", NeedsConfig, NeedsLabels))
    try:
        rd = run(make_config(algorithm={"name": "needs-labels"}, run={"num_rounds": 1}))
        cfg = make_config(algorithm={"name": "needs-labels"}, run={"num_rounds": 2})
        sim = Simulator(build_experiment(cfg), RunDir(rd.path))
        sim.resume()
        hist = json.loads((rd.path / "partition.json").read_text())["label_histograms"]
        assert {k: v["label_histogram"].tolist() for k, v in sim.exp.strategy.client_info.items()} == dict(
            enumerate(hist))
    finally:
        ALGORITHMS.pop("needs-labels", None)


def test_a_client_that_raised_keeps_its_record_unchanged(make_config):
    class Boom(SimulatorEngine):
        def send_and_receive(self, rnd, messages, events):
            self.node.runtime.hook = _RaiseFor(client=1, rnd=0)
            return super().send_and_receive(rnd, messages, events)

    cfg = make_config(algorithm={"name": "udec"}, run={"num_rounds": 1}, eval={"grid_size": 0, "loss_num_samples": 0})
    sim = Simulator(build_experiment(cfg), RunDir.create(cfg.run.out_dir, "boom"))
    sim.engine = Boom(sim.exp)
    sim.initialize()
    sim.run()
    assert 1 not in sim.engine.personal_models() and 0 in sim.engine.personal_models()
    assert sim.engine.clients[1].steps_done == 0


@pytest.mark.parametrize("metrics,reason", [({"loss": None}, "loss"), ({"loss": 0.1, "id": 7}, "id"),
                                            ({}, "loss")])
def test_reply_metrics_are_checked(make_config, metrics, reason):
    from feddiff.compress import wire

    def fault(rnd, inc):
        if inc.client != 0:
            return inc
        msg = wire.decode(inc.blob)
        msg.meta["metrics"] = metrics
        return Incoming(inc.client, wire.encode(msg))

    sim, rd = _run_with(make_config, fault)
    first = rd.read_metrics()[0]
    assert first["rejected"][0]["id"] == 0 and reason in first["rejected"][0]["reason"]
    assert [c["id"] for c in first["clients"]] == [1]


class Twice(FedAvg):
    def configure(self, rnd):
        return super().configure(rnd) + [super().configure(rnd)[0]]


class TwiceConfig(AlgorithmConfig):
    name: Literal["twice"] = F("twice", "algorithm: twice")


def test_two_tasks_for_one_client_are_a_clear_error(make_config):
    register(Algorithm("twice", TwiceConfig, Twice))
    try:
        with pytest.raises(ValueError, match="two tasks for client 0"):
            run(make_config(algorithm={"name": "twice"}, run={"num_rounds": 1}))
    finally:
        ALGORITHMS.pop("twice", None)
