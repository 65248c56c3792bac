"""The hierarchy and SCAFFOLD in runs: bytes per tier, disclosed histograms, exact resume."""

import pytest
import torch

from feddiff.engines.runner import resume, run

from tests.engines.test_simulator import final_weights


def hier_config(make_config, name="fedphd", num_rounds=4, **algo):
    return make_config(
        run={"num_rounds": num_rounds},
        partition={"num_clients": 4, "method": "pathological", "classes_per_client": 2},
        algorithm={"name": name, "fraction": 0.5, "central_every": 2, "central_a": 500.0, **algo},
        eval={"grid_size": 0, "loss_num_samples": 0}, model={"dropout": 0.1},
    )


def test_fedphd_run_counts_bytes_per_tier(make_config):
    rd = run(hier_config(make_config))
    m = rd.read_metrics()
    assert all("client-edge" in r["bytes"] and "client-server" not in r["bytes"] for r in m)
    central = [r["round"] for r in m if "edge-cloud" in r["bytes"]]
    assert central == [2, 4] and all(r.get("central") for r in m if r["round"] in central)
    # up: both edges send their model; down: the global model to both
    cloud = m[1]["bytes"]["edge-cloud"]
    client_down = m[0]["clients"][0]["bytes_down"]
    assert cloud["down"] == pytest.approx(2 * client_down, rel=0.01) and cloud["up"] > cloud["down"] - 100
    assert sum(m[1]["central_weights"]) == pytest.approx(1.0)
    assert set(m[0]["edges"]) == {"edge0", "edge1"} and len(m[0]["select_p"]) == 2
    # label histograms are disclosed once, to the edges, before round 1
    assert m[0]["bytes_setup"]["client-edge"]["up"] > 0 and all("bytes_setup" not in r for r in m[1:])
    assert m[-1]["bytes_cumulative"]["edge-cloud"]["down"] == 2 * cloud["down"]


@pytest.mark.parametrize("stop", [1, 2])  # after a plain round, and after a central one
def test_fedphd_resumes_bit_identical(make_config, stop):
    full = run(hier_config(make_config))
    part = run(hier_config(make_config, num_rounds=stop))
    resume(part.path, ["run.num_rounds=4"])
    a, b = final_weights(full), final_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = full.read_metrics(), part.read_metrics()
    assert [r.get("edges") for r in ma] == [r.get("edges") for r in mb]
    assert ma[-1]["central_weights"] == mb[-1]["central_weights"]


def test_hierfavg_asks_for_nothing_and_runs(make_config):
    rd = run(hier_config(make_config, name="hierfavg", selection="random", central_a=0.0))
    m = rd.read_metrics()
    assert "bytes_setup" not in m[0] and [r["round"] for r in m if "edge-cloud" in r["bytes"]] == [2, 4]


def test_scaffold_sends_controls_both_ways_and_resumes_exactly(make_config):
    cfg = dict(algorithm={"name": "scaffold"}, train={"optimizer": "sgd", "lr": 0.05},
               eval={"grid_size": 0, "loss_num_samples": 0})
    full = run(make_config(run={"num_rounds": 3}, **cfg))
    fedavg = run(make_config(run={"num_rounds": 1}, algorithm={"name": "fedavg"},
                             train={"optimizer": "sgd", "lr": 0.05}, eval=cfg["eval"]))
    m, f = full.read_metrics()[0]["clients"][0], fedavg.read_metrics()[0]["clients"][0]
    # the control variate doubles each message
    assert m["bytes_down"] == pytest.approx(2 * f["bytes_down"], rel=0.02)
    assert m["bytes_up"] == pytest.approx(2 * f["bytes_up"], rel=0.02)
    part = run(make_config(run={"num_rounds": 1}, **cfg))
    resume(part.path, ["run.num_rounds=3"])
    a, b = final_weights(full), final_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (rd.latest_checkpoint()[1] for rd in (full, part))
    controls = [k for k in ca if k.startswith("client/0/tensors/scaffold/") or k.startswith("strategy/control/")]
    assert controls and all(torch.equal(ca[k], cb[k]) for k in controls)  # c and c_i are checkpointed
    assert full.read_metrics()[-1]["control_norm"] == part.read_metrics()[-1]["control_norm"] > 0


def test_edge_models_are_evaluated_when_asked(make_config):
    cfg = hier_config(make_config, num_rounds=2, evaluate_edges=True)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"loss_num_samples": 16})})
    rd = run(cfg)
    ev = rd.read_metrics()[-1]["eval"]
    assert set(ev["side"]) == {"edge0", "edge1"} and "heldout_loss" in ev["side"]["edge0"]
    # after a central aggregation every edge holds the global model: the same held-out loss
    assert ev["side"]["edge0"]["heldout_loss"] == ev["heldout_loss"] == ev["side"]["edge1"]["heldout_loss"]


def test_shared_optimizer_scope_reproduces_the_authors_artefact_and_resumes(make_config):
    # FedPhD's code trains every client with one Adam: moments and warm-up carry from client to client
    from feddiff.engines.experiment import build_experiment
    from feddiff.engines.simulator import Simulator
    from feddiff.runs import RunDir

    def cfg(rounds):
        return make_config(run={"num_rounds": rounds}, train={"optimizer_scope": "shared", "warmup_steps": 10},
                           eval={"grid_size": 0, "loss_num_samples": 0})

    sim = Simulator(build_experiment(cfg(2)), RunDir.create(cfg(2).run.out_dir, "shared"))
    sim.initialize()
    rd = sim.run()
    shared = sim.engine.node.runtime.shared
    assert shared.steps_done == 2 * 2 * 2 and shared.optimizer  # 2 rounds x 2 clients x 2 steps, one counter
    assert all(c.optimizer is None and c.steps_done == 4 for c in sim.engine.clients)
    per_client = run(make_config(run={"num_rounds": 2}, train={"warmup_steps": 10},
                                 eval={"grid_size": 0, "loss_num_samples": 0}))
    a, b = final_weights(rd), final_weights(per_client)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    part = run(cfg(1))
    resume(part.path, ["run.num_rounds=2"])
    c = final_weights(part)
    assert all(torch.equal(a[k], c[k]) for k in a)
