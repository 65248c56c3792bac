"""[robust]: median, trimmed mean, clipping and outlier refusal, by hand, around FedAvg, SCAFFOLD, HierFAVG."""

import pytest
import torch

from feddiff.algorithms import Reply, strategy_from
from feddiff.algorithms.aggregate import clip_update, coordinate_median, trimmed_mean, update_norm
from feddiff.algorithms.fedavg import FedAvgConfig
from feddiff.algorithms.robust import RobustStrategy
from feddiff.config import ConfigError, RobustConfig


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_statistics_by_hand():
    assert torch.equal(coordinate_median([t(1, 9), t(5, 2), t(3, 4)]), t(3, 4))
    assert torch.equal(coordinate_median([t(1), t(2), t(3), t(10)]), t(2.5))  # even count: mean of the middle two
    assert torch.equal(trimmed_mean([t(1), t(2), t(3), t(100)], 0.25), t(2.5))  # drops 1 and 100
    assert torch.equal(trimmed_mean([t(1), t(2), t(3), t(100)], 0.2), t(26.5))  # floor(0.8) = 0 dropped
    assert update_norm({"w": t(3, 4), "n": torch.tensor([7])}, {"w": t(0, 0), "n": torch.tensor([1])}) == 5.0
    clipped, norm = clip_update({"w": t(3, 4), "b": t(1)}, {"w": t(0, 0)}, 1.0)
    assert norm == 5.0 and torch.allclose(clipped["w"], t(0.6, 0.8)) and torch.equal(clipped["b"], t(1))
    same, _ = clip_update({"w": t(0.3, 0.4)}, {"w": t(0, 0)}, 1.0)
    assert torch.equal(same["w"], t(0.3, 0.4))


def fedavg(n, **robust):
    s = RobustStrategy(strategy_from(FedAvgConfig(), n, 0), RobustConfig(**robust))
    s.initialize({"w": torch.zeros(2)})
    s.configure(0)
    return s


def test_median_replaces_the_weighted_mean():
    s = fedavg(3, aggregation="median")
    replies = [Reply(0, {"w": t(1, 0)}, 10), Reply(1, {"w": t(2, 5)}, 30), Reply(2, {"w": t(100, -100)}, 600)]
    kept, refused = s.screen(0, replies)
    assert kept == replies and refused == []
    s.aggregate(0, kept)
    # the 600-sample poisoned client would dominate a weighted mean; the median ignores weights
    assert torch.allclose(s.global_state()["w"], t(2, 0), atol=1e-6)
    assert s.round_metrics(0)["robust"] == {"aggregation": "median", "groups": {"0": 3}}


def test_outliers_are_refused_before_aggregation_with_their_norms():
    s = fedavg(4, outlier_factor=5.0)
    replies = [Reply(0, {"w": t(1, 0)}, 10), Reply(1, {"w": t(0, 1.1)}, 10), Reply(2, {"w": t(0.9, 0)}, 10),
               Reply(3, {"w": t(30, 40)}, 10)]
    kept, refused = s.screen(0, replies)
    assert [r.client for r in kept] == [0, 1, 2] and [f.client for f in refused] == [3]
    # norms 1, 1.1, 0.9, 50: median (1 + 1.1) / 2 = 1.05, and 50 / 1.05 = 47.6
    assert "update norm 50 is 47.6x the median of its group (1.05; robust.outlier_factor = 5)" in refused[0].reason
    s.aggregate(0, kept)
    assert torch.allclose(s.global_state()["w"], t(1.9 / 3, 1.1 / 3))
    # fewer than 3 replies: nothing to compare against, nothing refused
    assert s.screen(0, replies[2:])[1] == []


def test_clipping_bounds_each_update():
    s = fedavg(2, clip_norm=1.0)
    s.aggregate(0, [Reply(0, {"w": t(3, 4)}, 10), Reply(1, {"w": t(0, 0.5)}, 10)])
    assert torch.allclose(s.global_state()["w"], t(0.3, 0.4 + 0.25))
    assert s.round_metrics(0)["robust"]["clipped"] == {"0": 5.0}


def test_median_per_edge_in_a_hierarchy():
    from feddiff.algorithms.hierarchical import HierFAVGConfig

    cfg = HierFAVGConfig(num_edges=2, central_every=2, selection="fixed", edge_of=[0, 0, 0, 1, 1, 1])
    s = RobustStrategy(strategy_from(cfg, 6, 0), RobustConfig(aggregation="median"))
    s.initialize({"w": torch.zeros(1)})
    s.configure(0)
    vals = [1.0, 2.0, 50.0, -3.0, -4.0, 60.0]
    s.aggregate(0, [Reply(k, {"w": t(v)}, 10) for k, v in enumerate(vals)])
    assert torch.allclose(s.inner.edges[0]["w"], t(2.0)) and torch.allclose(s.inner.edges[1]["w"], t(-3.0))


def test_scaffold_extras_are_combined_too():
    from feddiff.algorithms.scaffold import ScaffoldConfig

    s = RobustStrategy(strategy_from(ScaffoldConfig(), 3, 0), RobustConfig(aggregation="median"))
    s.initialize({"w": torch.zeros(1)})
    s.configure(0)
    replies = [Reply(k, {"w": t(v)}, 10, extras={"dc/w": t(d)}) for k, (v, d) in
               enumerate([(1.0, 0.1), (2.0, 0.2), (90.0, 9.0)])]
    s.aggregate(0, replies)
    assert torch.allclose(s.global_state()["w"], t(2.0), atol=1e-6)
    # c <- c + (|S| / N) * median(dc): all 3 of 3 clients, so c = 0.2
    assert torch.allclose(s.inner.control["w"], t(0.2), atol=1e-6)


def test_config_checks():
    with pytest.raises(ValueError, match="above 1"):
        RobustConfig(outlier_factor=0.5)
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=r"robust.trim"):
        tiny_config("/nowhere", "/tmp/x", robust={"aggregation": "trimmed_mean", "trim": 0.5})
