"""FedPhD's rules against values computed by hand from the formulas (shared/reference/papers.md 1.2-1.5)."""

import math

import numpy as np
import pytest
import torch

from feddiff.algorithms import Reply, strategy_from
from feddiff.algorithms.fedphd import FedPhDConfig
from feddiff.algorithms.hierarchical import HierFAVGConfig
from feddiff.algorithms.homogeneity import (
    central_weights, distribution, homogeneity_score, merge, selection_probabilities, uniform_target,
)
from feddiff.seeding import numpy_rng

P = uniform_target(3)


def test_homogeneity_score_by_hand():
    assert homogeneity_score(P, P) == 2.0
    assert homogeneity_score(np.array([1.0, 0, 0]), P) == pytest.approx(2 - math.sqrt(4 / 9 + 1 / 9 + 1 / 9))
    assert homogeneity_score(np.array([0.25, 0.5, 0.25]), P) == pytest.approx(2 - math.sqrt(6) / 12)
    with pytest.raises(ValueError, match="over 2 classes vs a target over 3"):
        homogeneity_score(np.ones(2) / 2, P)


def test_merge_and_distribution():
    q, n = merge(np.array([0.5, 0.5, 0]), 100, np.array([0, 0.5, 0.5]), 100)
    assert q.tolist() == [0.25, 0.5, 0.25] and n == 200
    assert distribution([2, 0, 6]).tolist() == [0.25, 0, 0.75]
    with pytest.raises(ValueError, match="sum to 0"):
        distribution([0, 0])


def test_selection_probabilities_by_hand():
    # edge 0: q (.5, .5, 0), n 100; edge 1: q (0, 0, 1), n 50; client p (0, .5, .5), n 100; c = 100, b = 0
    probs = selection_probabilities([np.array([0.5, 0.5, 0]), np.array([0, 0, 1.0])], [100, 50],
                                    np.array([0, 0.5, 0.5]), 100, P, c=100, b=0, eps=0)
    r0 = 100 * (2 - math.sqrt(6) / 12) - 100  # merged (.25, .5, .25)
    r1 = 100 * (2 - math.sqrt(2) / 3) - 50  # merged (0, 1/3, 2/3)
    assert probs.tolist() == pytest.approx([r0 / (r0 + r1), r1 / (r0 + r1)], rel=1e-12)
    # a full edge (n_e > c * HS) gets only eps: the rule also balances load
    full = selection_probabilities([P, P], [10**6, 0], P, 10, P, c=10000, eps=1e-8)
    assert full[0] == pytest.approx(1e-8 / (1e-8 + 20000 + 1e-8)) and full[1] > 0.999


def test_central_weights_by_hand():
    q = [np.array([0.25, 0.5, 0.25]), np.array([1.0, 0, 0])]
    lam = central_weights([200, 100], q, P, a=100)
    l0, l1 = 200 + 100 * (2 - math.sqrt(6) / 12), 100 + 100 * (2 - math.sqrt(6) / 3)
    assert lam.tolist() == pytest.approx([l0 / (l0 + l1), l1 / (l0 + l1)], rel=1e-12)
    assert central_weights([200, 100], q, P, a=0).tolist() == pytest.approx([2 / 3, 1 / 3])  # HierFAVG
    assert central_weights([200, 100], q, P, a=0, b=-150).tolist() == [1.0, 0.0]  # ReLU
    with pytest.raises(ValueError, match="every central weight is 0"):
        central_weights([1, 1], q, P, a=0, b=-5)


HIST = {0: [30, 0, 0], 1: [0, 20, 20], 2: [10, 10, 0], 3: [0, 0, 40]}


def fedphd(**kw):
    cfg = FedPhDConfig(central_every=2, central_a=100.0, select_c=100.0, **kw)
    s = strategy_from(cfg, 4, seed=7)
    for k, h in HIST.items():
        s.receive_info(k, {"label_histogram": torch.tensor(h)})
    s.initialize({"w": torch.zeros(2)})
    return s


def test_fedphd_trace_edge_choices_stats_and_central_weights_by_hand():
    s = fedphd()
    tasks = s.configure(0)
    # round 0: every edge at (p*, 0); each client's probabilities from the same snapshot
    rng = numpy_rng(7, "edge-select", 0)
    expected = {}
    for k in range(4):
        p_k = np.array(HIST[k], dtype=float) / sum(HIST[k])
        r = 100 * homogeneity_score(p_k, P) + 1e-8  # merge(p*, 0; p_k, n_k) = p_k, n_e = 0
        assert s.summary["select_p"][str(k)] == pytest.approx([0.5, 0.5], abs=1e-6)
        expected[k] = int(rng.choice(2, p=np.array([r, r]) / (2 * r)))
    assert {t.client: s.pending[t.client] for t in tasks} == expected
    assert all(t.link == "client-edge" for t in tasks)
    # aggregation: edge models are the sample-weighted means of their clients; stats fold the arrivals
    replies = [Reply(k, {"w": torch.full((2,), float(k))}, sum(HIST[k])) for k in range(4)]
    s.aggregate(0, replies)
    for e in (0, 1):
        mine = [k for k in range(4) if expected[k] == e]
        if not mine:
            continue
        n = sum(sum(HIST[k]) for k in mine)
        assert s.edges[e]["w"][0].item() == pytest.approx(sum(k * sum(HIST[k]) for k in mine) / n)
        assert s.edge_samples[e] == n and s.n[e] == n
        counts = np.sum([HIST[k] for k in mine], axis=0)
        assert s.q[e].tolist() == pytest.approx((counts / counts.sum()).tolist())
    assert s.exchange(0, []) == []  # central_every = 2: round 0 is not central ("every" schedule)


def test_fedphd_central_aggregation_by_hand_and_reset():
    s = fedphd(edge_of=[0, 0, 1, 1], selection="fixed")
    s.configure(1)
    s.aggregate(1, [Reply(k, {"w": torch.full((2,), float(k))}, sum(HIST[k])) for k in range(4)])
    up = s.exchange(1, [])
    assert [(t.src, t.dst, t.direction) for t in up] == [("edge0", "cloud", "up"), ("edge1", "cloud", "up")]
    assert [t.meta["num_samples"] for t in up] == [70.0, 60.0]
    q0, q1 = np.array([30, 20, 20]) / 70, np.array([10, 10, 40]) / 60
    down = s.exchange(1, up)
    l0 = 70 + 100 * homogeneity_score(q0, P)
    l1 = 60 + 100 * homogeneity_score(q1, P)
    w0, w1 = (1 * 40) / 70, (2 * 20 + 3 * 40) / 60
    assert s.summary["central_weights"] == pytest.approx([l0 / (l0 + l1), l1 / (l0 + l1)], abs=1e-6)
    assert s.global_state()["w"][0].item() == pytest.approx((l0 * w0 + l1 * w1) / (l0 + l1), rel=1e-6)
    assert s.exchange(1, down) == [] and s.summary["central"]
    assert all(torch.equal(e["w"], s.global_state()["w"]) for e in s.edges)
    assert all(q.tolist() == pytest.approx(P.tolist()) for q in s.q) and s.n == [0.0, 0.0]


def test_selection_modes_and_schedule():
    cfg = HierFAVGConfig(selection="round-robin", num_edges=3, central_every=5)
    s = strategy_from(cfg, 7, seed=0)
    s.initialize({"w": torch.zeros(1)})
    assert [s.pending[t.client] for t in s.configure(0)] == [0, 1, 2, 0, 1, 2, 0]
    assert s.needs == ()  # HierFAVG with random/round-robin edges and a = 0 asks for no label counts
    assert [r for r in range(12) if s.is_central(r)] == [4, 9]
    code = strategy_from(HierFAVGConfig(central_schedule="code"), 2, seed=0)
    assert [r for r in range(12) if code.is_central(r)] == [0, 5, 10]
    with pytest.raises(ValueError, match="edge_of"):
        HierFAVGConfig(selection="fixed")
    with pytest.raises(ValueError, match="edges are 0..1"):
        HierFAVGConfig(selection="fixed", edge_of=[0, 2])


def test_feddiff_config_lists_the_hierarchy_fields():
    from feddiff.config import Config, describe

    rows = [(k, d) for k, _, d in describe(Config)]
    assert ("algorithm.central_a", "[hierfavg] central weights max(N_e + a*HS(q_e) + b, 0): a (0 = sample-weighted "
            "HierFAVG)") in rows
    assert any(k == "algorithm.central_a" and d.startswith("[fedphd]") for k, d in rows)
    assert any(k == "algorithm.global_lr" and d.startswith("[scaffold]") for k, d in rows)
