"""[dp]: clipping before aggregation, a fixed denominator, calibrated noise, Opacus' epsilon, failing closed."""

import pytest
import torch

from feddiff.algorithms import Reply, strategy_from
from feddiff.algorithms.dp import DPError, DPStrategy, epsilon
from feddiff.algorithms.fedavg import FedAvgConfig
from feddiff.config import ConfigError, DPConfig


def dp_fedavg(n, sigma, clip, size=4, reproducible=True):
    cfg = DPConfig(noise_multiplier=sigma, clip_norm=clip, reproducible_noise=reproducible)
    s = DPStrategy(strategy_from(FedAvgConfig(), n, 0), cfg, seed=7)
    s.initialize({"w": torch.zeros(size)})
    s.configure(0)
    return s


def test_the_noise_std_matches_its_calibration():
    # 4 clients selected, none moves: the new model is pure noise of std 2 * sigma * C / M = 2 * 1.5 * 2 / 4 = 1.5
    size = 200_000
    s = dp_fedavg(4, 1.5, 2.0, size)
    s.aggregate(0, [Reply(k, {"w": torch.zeros(size)}, 10 * (k + 1)) for k in range(4)])
    w = s.global_state()["w"].double()
    # the sample std of 200k normals is within 1% of the true one with overwhelming probability
    assert abs(w.std().item() / 1.5 - 1) < 0.01 and abs(w.mean().item()) < 5 * 1.5 / size**0.5


def test_clipping_before_aggregation_and_a_fixed_denominator():
    s = dp_fedavg(4, 1e-9, 1.0)  # (all but) no noise: what is left is sum of clipped updates / M
    replies = [Reply(0, {"w": torch.tensor([1e6, 0, 0, 0])}, 1000), Reply(1, {"w": torch.tensor([0.0, 0.1, 0, 0])}, 1),
               Reply(2, {"w": torch.tensor([0.0, 0.1, 0, 0])}, 1)]  # client 3 failed: a zero update, M stays 4
    s.aggregate(0, replies)
    # equal weights, the huge one clipped to norm 1: (1 + 0 + 0) / 4 and (0 + 0.1 + 0.1) / 4
    assert torch.allclose(s.global_state()["w"], torch.tensor([0.25, 0.05, 0, 0]), atol=1e-6)


def test_noise_is_fresh_unless_reproducible_is_asked():
    def noise(reproducible):
        s = dp_fedavg(2, 1.0, 1.0, reproducible=reproducible)
        s.aggregate(0, [Reply(0, {"w": torch.zeros(4)}, 1), Reply(1, {"w": torch.zeros(4)}, 1)])
        return s.global_state()["w"], s.round_metrics(0)["dp"]["noise"]

    (a, how), (b, _) = noise(True), noise(True)
    assert torch.equal(a, b) and how == "seeded (not private)"
    (c, how), (d, _) = noise(False), noise(False)
    assert not torch.equal(c, d) and how == "os entropy"


def test_epsilon_is_opacus_rdp_accountants_at_sampling_rate_one():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.1, sample_rate=1.0)  # no amplification claimed for fixed-size sampling
    s = dp_fedavg(5, 1.1, 1.0)
    for rnd in range(3):
        if rnd:
            s.configure(rnd)
        s.aggregate(rnd, [Reply(0, {"w": torch.ones(4)}, 1)])
    assert s.round_metrics(2)["dp"]["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), abs=1e-6)
    assert s.idle_metrics(3)["dp"]["rounds"] == 3  # a round without aggregation spends nothing
    tensors, meta = s.state_dict()  # the rounds spent survive a checkpoint
    t = dp_fedavg(5, 1.1, 1.0)
    t.load_state_dict(tensors, meta)
    assert t.dp_rounds == 3
    meta.pop("dp_rounds")
    with pytest.raises(DPError, match="does not record the DP rounds"):
        t.load_state_dict(tensors, meta)


@pytest.mark.parametrize("sections, match", [
    ({"dp": {"noise_multiplier": 1.0}}, "needs dp.clip_norm > 0"),
    ({"dp": {"clip_norm": 1.0}}, "dp.clip_norm is set but dp.noise_multiplier = 0"),
    ({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "algorithm": {"name": "scaffold"}}, "not 'scaffold'"),
    ({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "algorithm": {"name": "udec"}}, "not 'udec'"),
    ({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "algorithm": {"name": "usplit"}}, "not 'usplit'"),
    ({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "robust": {"aggregation": "median"}}, "robust.aggregation"),
    ({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "robust": {"outlier_factor": 5.0}}, "robust.aggregation"),
    ({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "eval": {"federated_reference": True}}, "federated_reference"),
    ({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0, "max_epsilon": 0.1}},
     r"planned 2 rounds would spend epsilon = [\d.]+ .* over dp.max_epsilon = 0.1"),
])
def test_it_fails_closed_before_training(make_config, sections, match):
    with pytest.raises(ConfigError, match=match):
        make_config(**sections)


def test_it_fails_closed_during_a_round(make_config):
    s = dp_fedavg(2, 1.0, 1.0)
    with pytest.raises(DPError, match="holds \\['v'\\], which the server cannot clip"):
        s.aggregate(0, [Reply(0, {"w": torch.zeros(4), "v": torch.zeros(1)}, 1)])
    assert s.expected_extras(s.dp_tasks[0]) == {}  # a reply with extras is refused by validation first


def test_a_dp_run_records_the_budget_in_every_line_and_resumes_exactly(make_config):
    from feddiff.engines.runner import resume, run
    from feddiff.report.document import build_report, table_cells
    from tests.engines.test_simulator import final_weights

    sections = {"dp": {"noise_multiplier": 0.8, "clip_norm": 0.5, "reproducible_noise": True}, "run": {"num_rounds": 3},
                "eval": {"grid_size": 0, "loss_num_samples": 0}}
    whole = run(make_config(**sections))
    eps = [m["dp"]["epsilon"] for m in whole.read_metrics()]
    assert eps == sorted(eps) and eps[0] > 0 and eps[-1] == pytest.approx(epsilon(0.8, 1.0, 3, 1e-5), abs=1e-6)
    part = run(make_config(**{**sections, "run": {"num_rounds": 2}}))
    resume(part.path, ["run.num_rounds=3"])
    a, b = final_weights(whole), final_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rep = build_report([whole.path], whole.path.parent.parent / "dp-report")
    cols, cells = table_cells(rep.rows)
    assert cells[0][cols.index("DP epsilon (delta)")] == f"{eps[-1]:.3g} (1e-05)"


def test_a_round_that_aggregates_nothing_still_records_the_budget(make_config, monkeypatch):
    from feddiff.client.runtime import ClientRuntime
    from feddiff.engines.runner import run

    handle = ClientRuntime.handle

    def offline_in_round_2(self, task, *args, **kwargs):
        if task.config["round"] == 1:
            raise RuntimeError("offline")
        return handle(self, task, *args, **kwargs)

    monkeypatch.setattr(ClientRuntime, "handle", offline_in_round_2)
    rd = run(make_config(dp={"noise_multiplier": 0.8, "clip_norm": 0.5}, run={"num_rounds": 3},
                         eval={"grid_size": 0, "loss_num_samples": 0}))
    m = rd.read_metrics()
    assert "skipped" in m[1] and [r["dp"]["rounds"] for r in m] == [1, 1, 2]
    assert m[1]["dp"]["epsilon"] == m[0]["dp"]["epsilon"] and m[2]["dp"]["noise"] == "os entropy"
