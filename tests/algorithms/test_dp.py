"""[dp]: clipping before aggregation, calibrated noise, Opacus' epsilon, and failing closed."""

import pytest
import torch

from feddiff.algorithms import Reply, strategy_from
from feddiff.algorithms.dp import DPError, DPStrategy, epsilon
from feddiff.algorithms.fedavg import FedAvgConfig
from feddiff.config import ConfigError, DPConfig


def dp_fedavg(n, sigma, clip, size=4):
    s = DPStrategy(strategy_from(FedAvgConfig(), n, 0), DPConfig(noise_multiplier=sigma, clip_norm=clip), seed=7,
                   rate=1.0)
    s.initialize({"w": torch.zeros(size)})
    s.configure(0)
    return s


def test_the_noise_std_matches_its_calibration():
    # m clients that do not move: the new model is pure noise of std sigma * C / m
    n, sigma, clip, size = 4, 1.5, 2.0, 200_000
    s = dp_fedavg(n, sigma, clip, size)
    s.aggregate(0, [Reply(k, {"w": torch.zeros(size)}, 10 * (k + 1)) for k in range(n)])
    w = s.global_state()["w"].double()
    expected = sigma * clip / n
    # the sample std of 200k normals is within 1% of the true one with overwhelming probability
    assert abs(w.std().item() / expected - 1) < 0.01 and abs(w.mean().item()) < 5 * expected / size**0.5
    assert s.round_metrics(0)["dp"]["noise_std"] == expected


def test_one_huge_update_is_clipped_before_aggregation():
    s = dp_fedavg(4, 1e-9, 1.0)  # (all but) no noise: what is left is the mean of clipped updates
    replies = [Reply(0, {"w": torch.tensor([1e6, 0, 0, 0])}, 1000)] + [
        Reply(k, {"w": torch.tensor([0.0, 0.1, 0, 0])}, 1) for k in (1, 2, 3)]
    s.aggregate(0, replies)
    # equal weights, the huge one clipped to norm 1: (1 + 0 + 0 + 0) / 4 and 3 x 0.1 / 4
    assert torch.allclose(s.global_state()["w"], torch.tensor([0.25, 0.075, 0, 0]), atol=1e-6)
    assert s.round_metrics(0)["dp"]["clipped"] == 1


def test_epsilon_is_opacus_rdp_accountants():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.1, sample_rate=0.2)
    assert epsilon(1.1, 0.2, 30, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    s = DPStrategy(strategy_from(FedAvgConfig(), 5, 0), DPConfig(noise_multiplier=1.1, clip_norm=1.0), seed=0, rate=0.2)
    s.initialize({"w": torch.zeros(2)})
    for rnd in range(3):
        s.configure(rnd)
        s.aggregate(rnd, [Reply(0, {"w": torch.ones(2)}, 1)])
    assert s.round_metrics(2)["dp"]["epsilon"] == pytest.approx(epsilon(1.1, 0.2, 3, 1e-5), abs=1e-6)
    tensors, meta = s.state_dict()  # the rounds spent survive a checkpoint
    t = DPStrategy(strategy_from(FedAvgConfig(), 5, 0), DPConfig(noise_multiplier=1.1, clip_norm=1.0), seed=0, rate=0.2)
    t.load_state_dict(tensors, meta)
    assert t.dp_rounds == 3


def test_it_fails_closed(make_config):
    with pytest.raises(ConfigError, match="needs dp.clip_norm > 0"):
        make_config(dp={"noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="not available with algorithm 'scaffold'"):
        make_config(dp={"noise_multiplier": 1.0, "clip_norm": 1.0}, algorithm={"name": "scaffold"})
    with pytest.raises(ConfigError, match=r"planned 2 rounds would spend epsilon = [\d.]+ .* over dp.max_epsilon = 0.1"):
        make_config(dp={"noise_multiplier": 1.0, "clip_norm": 1.0, "max_epsilon": 0.1})
    s = dp_fedavg(2, 1.0, 1.0)
    with pytest.raises(DPError, match="holds \\['v'\\], which the server did not send"):
        s.aggregate(0, [Reply(0, {"w": torch.zeros(4), "v": torch.zeros(1)}, 1)])


def test_a_dp_run_records_epsilon_every_round_and_resumes_exactly(make_config):
    from feddiff.engines.runner import resume, run
    from tests.engines.test_simulator import final_weights

    sections = {"dp": {"noise_multiplier": 0.8, "clip_norm": 0.5}, "run": {"num_rounds": 3},
                "eval": {"grid_size": 0, "loss_num_samples": 0}}
    whole = run(make_config(**sections))
    eps = [m["dp"]["epsilon"] for m in whole.read_metrics()]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(epsilon(0.8, 1.0, 3, 1e-5), abs=1e-6)
    part = run(make_config(**{**sections, "run": {"num_rounds": 2}}))
    resume(part.path, ["run.num_rounds=3"])
    a, b = final_weights(whole), final_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert part.read_metrics()[-1]["dp"]["epsilon"] == eps[-1]
    from feddiff.report.document import build_report, table_cells

    rep = build_report([whole.path], whole.path.parent.parent / "dp-report")
    cols, cells = table_cells(rep.rows)
    assert cells[0][cols.index("DP epsilon (delta)")] == f"{eps[-1]:.3g} (1e-05)"
