"""Faults injected into real tiny federations: every kind refused with its reason, round policies, rollback."""

import pytest
import torch

from feddiff.engines.experiment import build_experiment
from feddiff.engines.faults import FaultyEngine, random_plan
from feddiff.engines.simulator import Simulator, SimulatorEngine
from feddiff.runs import RunDir
from tests.engines.test_simulator import final_weights

NO_EVAL = {"grid_size": 0, "loss_num_samples": 0}


def run_with(cfg, plan, tmp_path, name):
    exp = build_experiment(cfg)
    engine = FaultyEngine(SimulatorEngine(exp), plan)
    sim = Simulator(exp, RunDir.create_at(tmp_path / name), engine=engine)
    sim.initialize()
    rd = sim.run()
    return rd, engine


def checkpoint(rd, rnd=None):
    paths = dict(rd.checkpoints())
    return rd.load_checkpoint(paths[rnd if rnd is not None else max(paths)])[1]


def test_every_kind_of_bad_reply_is_refused_with_its_reason(make_config, tmp_path):
    cfg = make_config(run={"num_rounds": 2, "keep_checkpoints": 3}, partition={"num_clients": 4, "method": "iid"},
                      eval=NO_EVAL)
    schedule = {(0, 0): "raise", (0, 1): "nan", (0, 2): "wrong_shape",
                (1, 0): "wrong_name", (1, 1): "truncate", (1, 2): "oversize", (1, 3): "disconnect"}
    rd, engine = run_with(cfg, lambda r, c, a: schedule.get((r, c)), tmp_path, "f")
    m = rd.read_metrics()
    reasons = {(rec["round"], x["id"]): x["reason"] for rec in m for x in rec.get("rejected", [])}
    assert "injected: client 0 raised" in reasons[(1, 0)]
    assert "non-finite" in reasons[(1, 1)] or "NaN" in reasons[(1, 1)]
    assert "shape" in reasons[(1, 2)]
    assert [c["id"] for c in m[0]["clients"]] == [3]  # round 1 counts with the one good reply
    assert "unexpected" in reasons[(2, 0)] or "missing" in reasons[(2, 0)] or "renamed" in reasons[(2, 0)]
    assert "checksum" in reasons[(2, 1)]
    assert "exceeds this task's limit" in reasons[(2, 2)]
    assert "disconnected" in reasons[(2, 3)]
    assert m[1]["skipped"].startswith("no usable reply") and m[1]["clients"] == []
    # the global model after round 2 is the one after round 1: nothing bad reached it
    after1, after2 = checkpoint(rd, 1), checkpoint(rd, 2)
    glob = [k for k in after1 if k.startswith("strategy/")]
    assert glob and all(torch.equal(after1[k], after2[k]) for k in glob)
    assert len(engine.injected) == 7


def test_a_poisoned_update_is_screened_out(make_config, tmp_path):
    sections = {"partition": {"num_clients": 4, "method": "iid"}, "eval": NO_EVAL,
                "robust": {"outlier_factor": 5.0}, "run": {"num_rounds": 2}}
    poisoned, _ = run_with(make_config(**sections), lambda r, c, a: "huge_norm" if c == 3 else None, tmp_path, "p")
    gone, _ = run_with(make_config(**sections), lambda r, c, a: "disconnect" if c == 3 else None, tmp_path, "g")
    m = poisoned.read_metrics()
    assert all(rec["rejected"][0]["id"] == 3 and "update norm" in rec["rejected"][0]["reason"] for rec in m)
    a, b = final_weights(poisoned), final_weights(gone)
    assert all(torch.equal(a[k], b[k]) for k in a)  # as if client 3 had not answered at all


def test_a_round_short_of_its_quorum_is_discarded_and_its_clients_rolled_back(make_config, tmp_path):
    # SCAFFOLD's client control variates must not keep an update the server never aggregated
    sections = {"algorithm": {"name": "scaffold"}, "train": {"optimizer": "sgd", "lr": 0.05},
                "partition": {"num_clients": 3, "method": "iid"}, "faults": {"min_replies": 3},
                "eval": NO_EVAL, "run": {"num_rounds": 3}}
    one, _ = run_with(make_config(**sections), lambda r, c, a: "raise" if (r, c) == (1, 2) else None, tmp_path, "one")
    every, _ = run_with(make_config(**sections), lambda r, c, a: "raise" if r == 1 else None, tmp_path, "all")
    m = one.read_metrics()
    assert m[1]["round_policy"] == {"policy": "quorum", "min_replies": 3, "attempts": [], "counted": False,
                                    "reason": "2 usable replies, fewer than faults.min_replies = 3"}
    assert m[1]["skipped"].startswith("2 usable replies") and {x["id"] for x in m[1]["rejected"]} == {0, 1, 2}
    a, b = checkpoint(one), checkpoint(every)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # clients' records included
    assert any(k.startswith("client/0/tensors/scaffold") for k in a)


def test_a_retry_recovers_the_round_exactly(make_config, tmp_path):
    sections = {"partition": {"num_clients": 3, "method": "iid"}, "eval": NO_EVAL, "run": {"num_rounds": 2},
                "faults": {"policy": "reject", "retries": 1}}
    clean, _ = run_with(make_config(**sections), lambda r, c, a: None, tmp_path, "clean")
    flaky, engine = run_with(make_config(**sections), lambda r, c, a: "disconnect" if (r, c, a) == (0, 1, 0) else None,
                             tmp_path, "flaky")
    m = flaky.read_metrics()
    assert m[0]["round_policy"]["attempts"] == [
        {"replies": 2, "short": '1 of 3 clients gave no usable reply (faults.policy = "reject")',
         "failed": [{"id": 1, "reason": "injected: client 1 disconnected"}]}]
    assert m[0]["round_policy"]["counted"] and [c["id"] for c in m[0]["clients"]] == [0, 1, 2]
    a, b = final_weights(clean), final_weights(flaky)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the retried client trained exactly as it would have
    assert m[0]["bytes"]["client-server"]["down"] > clean.read_metrics()[0]["bytes"]["client-server"]["down"]
    # without retries, reject skips the round
    strict, _ = run_with(make_config(**{**sections, "faults": {"policy": "reject"}}),
                         lambda r, c, a: "disconnect" if (r, c) == (0, 1) else None, tmp_path, "strict")
    assert strict.read_metrics()[0]["skipped"].startswith("1 of 3 clients gave no usable reply")


@pytest.mark.parametrize("seed", [0, 1])
def test_a_federation_with_30_percent_failures_finishes(make_config, tmp_path, seed):
    cfg = make_config(partition={"num_clients": 5, "method": "iid"}, eval=NO_EVAL, run={"num_rounds": 4},
                      faults={"min_replies": 2, "retries": 2})
    plan = random_plan(0.3, seed=seed)
    rd, engine = run_with(cfg, plan, tmp_path, f"s{seed}")
    m = rd.read_metrics()
    assert [r["round"] for r in m] == [1, 2, 3, 4]
    expected_bad = {(r, c) for r, c, a, kind in engine.injected if kind != "huge_norm"}
    assert expected_bad  # the plan did inject at this rate
    for rec in m:
        counted = "skipped" not in rec
        replies = len(rec["clients"])
        assert (replies >= 2) == counted
    assert torch.isfinite(torch.cat([v.flatten().double() for v in final_weights(rd).values()])).all()


def test_bounded_wait_counts_only_replies_within_the_deadline(make_config, tmp_path):
    from feddiff.config import ConfigError

    base = {"partition": {"num_clients": 2, "method": "iid"}, "eval": NO_EVAL, "run": {"num_rounds": 2}}
    with pytest.raises(ConfigError, match="bounded_wait.*needs deadline_s"):
        make_config(**base, faults={"policy": "bounded_wait"})
    plain, _ = run_with(make_config(**base), lambda r, c, a: None, tmp_path, "plain")
    patient, _ = run_with(make_config(**base, faults={"policy": "bounded_wait", "deadline_s": 600}),
                          lambda r, c, a: None, tmp_path, "patient")
    a, b = final_weights(plain), final_weights(patient)
    assert all(torch.equal(a[k], b[k]) for k in a)  # every reply in time: nothing changes
    hasty, _ = run_with(make_config(**base, faults={"policy": "bounded_wait", "deadline_s": 1e-6}),
                        lambda r, c, a: None, tmp_path, "hasty")
    m = hasty.read_metrics()
    assert all("skipped" in rec for rec in m)
    assert all("no reply within faults.deadline_s = 1e-06 s" in x["reason"] for rec in m for x in rec["rejected"])
    init = checkpoint(hasty)
    assert all(torch.equal(init[k], checkpoint(hasty, 1)[k]) for k in init if k.startswith("strategy/"))


# -- found in review: each failed before its fix -----------------------------------------------------


def test_a_poisoned_client_is_not_let_in_by_a_retry(make_config, tmp_path):
    cfg = make_config(partition={"num_clients": 4, "method": "iid"}, eval=NO_EVAL, run={"num_rounds": 1},
                      robust={"outlier_factor": 5.0}, faults={"policy": "reject", "retries": 1})
    rd, _ = run_with(cfg, lambda r, c, a: "huge_norm" if c == 3 else None, tmp_path, "p")
    rec = rd.read_metrics()[0]
    assert rec["skipped"].startswith("1 of 4 clients gave no usable reply")  # not retried into the round
    assert any(x["id"] == 3 and "update norm" in x["reason"] for x in rec["rejected"])


def test_a_discarded_round_that_pruned_leaves_the_clients_working(make_config, tmp_path):
    cfg = make_config(partition={"num_clients": 3, "method": "iid"}, eval=NO_EVAL, run={"num_rounds": 4},
                      prune={"ratio": 0.3, "at": 1}, faults={"min_replies": 3})
    rd, _ = run_with(cfg, lambda r, c, a: "raise" if (r, c) == (1, 2) else None, tmp_path, "p")
    m = rd.read_metrics()
    assert "skipped" in m[1] and [len(r["clients"]) for r in (m[0], m[2], m[3])] == [3, 3, 3]


def test_a_discarded_round_undoes_what_configure_changed(make_config, tmp_path):
    # SCAFFOLD's reset_every zeroes the server's c in configure; if that round is discarded, the clients
    # keep their c_i, so c must come back too: c = mean(c_i) holds (every client takes part each round)
    sections = {"algorithm": {"name": "scaffold", "reset_every": 2}, "train": {"optimizer": "sgd", "lr": 0.05},
                "partition": {"num_clients": 3, "method": "iid"}, "faults": {"min_replies": 3},
                "eval": NO_EVAL, "run": {"num_rounds": 4}}
    rd, _ = run_with(make_config(**sections), lambda r, c, a: "raise" if (r, c) == (2, 2) else None, tmp_path, "one")
    t = checkpoint(rd)
    for k in [k for k in t if k.startswith("strategy/control/")]:
        name = k.removeprefix("strategy/control/")
        mean = sum(t[f"client/{c}/tensors/scaffold/{name}"] for c in range(3)) / 3
        assert torch.allclose(t[k], mean, atol=1e-6), name


@pytest.mark.parametrize("train", [{"optimizer_scope": "shared"}, {"keep_optimizer_state": True}])
def test_a_discarded_round_undoes_optimizer_states(make_config, tmp_path, train):
    sections = {"partition": {"num_clients": 3, "method": "iid"}, "faults": {"min_replies": 3}, "train": train,
                "eval": NO_EVAL, "run": {"num_rounds": 3}}
    one, _ = run_with(make_config(**sections), lambda r, c, a: "raise" if (r, c) == (1, 2) else None, tmp_path, "one")
    every, _ = run_with(make_config(**sections), lambda r, c, a: "raise" if r == 1 else None, tmp_path, "all")
    a, b = checkpoint(one), checkpoint(every)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_retry_after_a_refused_reply_trains_from_before_the_round(make_config, tmp_path):
    # the client trained (its record moved on) but its reply held NaN: the retry starts from its old record
    sections = {"algorithm": {"name": "scaffold"}, "train": {"optimizer": "sgd", "lr": 0.05},
                "partition": {"num_clients": 3, "method": "iid"}, "eval": NO_EVAL, "run": {"num_rounds": 2},
                "faults": {"policy": "reject", "retries": 1}}
    clean, _ = run_with(make_config(**sections), lambda r, c, a: None, tmp_path, "clean")
    flaky, _ = run_with(make_config(**sections), lambda r, c, a: "nan" if (r, c, a) == (0, 1, 0) else None,
                        tmp_path, "flaky")
    a, b = checkpoint(clean), checkpoint(flaky)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_deadline_does_not_apply_to_setup_queries(make_config, tmp_path):
    cfg = make_config(algorithm={"name": "hierfavg", "num_edges": 2, "selection": "homogeneity"},
                      partition={"num_clients": 4}, eval=NO_EVAL, run={"num_rounds": 1},
                      faults={"deadline_s": 1e-6})
    rd, _ = run_with(cfg, lambda r, c, a: None, tmp_path, "q")  # the label-histogram query is answered
    assert "skipped" in rd.read_metrics()[0]  # while every training reply is late


def test_oversize_is_past_the_limit_for_a_real_model():
    from feddiff.compress import wire
    from feddiff.engines.faults import _alter

    blob = wire.encode(wire.Message({"w": torch.zeros(1_000_000)}, {"num_samples": 1}))
    limit = 2 * 4 * 1_000_000 + (1 << 20)
    assert len(_alter(blob, "oversize", None)) > limit


def test_an_oversized_query_answer_is_refused_before_it_is_parsed(make_config, tmp_path):
    from feddiff.engines.loop import Incoming, query_limit
    from feddiff.runs import RunError

    cfg = make_config(algorithm={"name": "hierfavg", "num_edges": 2, "selection": "homogeneity"},
                      partition={"num_clients": 4}, eval=NO_EVAL, run={"num_rounds": 1})
    exp = build_experiment(cfg)
    inner = SimulatorEngine(exp)

    class Padding:  # a node whose label-histogram answer is huge
        def send_and_receive(self, rnd, messages, events):
            out = inner.send_and_receive(rnd, messages, events)
            limit = query_limit(exp.strategy.global_state())
            return [Incoming(i.client, i.blob + bytes(limit)) if rnd < 0 and i.client == 1 else i for i in out]

        def __getattr__(self, name):
            return getattr(inner, name)

    sim = Simulator(exp, RunDir.create_at(tmp_path / "q"), engine=Padding())
    sim.initialize()
    with pytest.raises(RunError, match=r"client 1's answer to the query \['label_histogram'\] is \d+ bytes, over"):
        sim.run()


@pytest.fixture
def hold(monkeypatch):
    """Clients that hang (until released) or step slowly, by round and client; the hung threads are let go
    and joined at the end, so nothing runs on into later tests."""
    import threading
    import time

    from feddiff.client.runtime import ClientRuntime

    release = threading.Event()
    plan: dict[tuple[int, int], str] = {}
    handle = ClientRuntime.handle

    def patched(self, task, state, images, progress=None):
        what = plan.get((task.config["round"], task.client))
        if what == "hang":
            release.wait(60)
        if what == "slow":  # 0.3 s before every step: long, but alive
            inner = progress

            def progress():
                time.sleep(0.3)
                inner()
        return handle(self, task, state, images, progress=progress)

    monkeypatch.setattr(ClientRuntime, "handle", patched)
    yield plan
    release.set()
    for t in threading.enumerate():
        if t.name.startswith("feddiff-client-"):
            t.join(30)


def test_a_hung_client_is_given_up_and_a_slow_one_is_not(make_config, tmp_path, hold):
    cfg = make_config(partition={"num_clients": 3, "method": "iid"}, eval=NO_EVAL, run={"num_rounds": 2},
                      train={"local_steps": 6}, faults={"stall_s": 1.0})
    hold.update({(0, 1): "hang", (0, 2): "slow", (1, 2): "slow"})  # client 2: 6 steps x 0.3 s = 1.8 s > 1 s
    rd, _ = run_with(cfg, lambda r, c, a: None, tmp_path, "h")
    m = rd.read_metrics()
    assert m[0]["rejected"] == [{"id": 1, "reason": "TimeoutError: hung: no training step for 1 s (faults.stall_s)"}]
    assert [c["id"] for c in m[0]["clients"]] == [0, 2] and [c["id"] for c in m[1]["clients"]] == [0, 1, 2]
    # the client given up in round 1 is back in round 2 from its old record, on a fresh working model
    assert torch.isfinite(torch.cat([v.flatten().double() for v in final_weights(rd).values()])).all()


def test_a_client_past_the_deadline_is_given_up_while_it_runs(make_config, tmp_path, hold):
    import time

    cfg = make_config(partition={"num_clients": 2, "method": "iid"}, eval=NO_EVAL, run={"num_rounds": 1},
                      faults={"deadline_s": 1.0})
    hold.update({(0, 0): "hang"})
    t = time.monotonic()
    rd, _ = run_with(cfg, lambda r, c, a: None, tmp_path, "d")
    assert time.monotonic() - t < 30  # it did not wait for the hung client (60 s)
    rec = rd.read_metrics()[0]
    assert rec["rejected"] == [{"id": 0, "reason": "TimeoutError: no reply within faults.deadline_s = 1 s"}]
    assert [c["id"] for c in rec["clients"]] == [1]
