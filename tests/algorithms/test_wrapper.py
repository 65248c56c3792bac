"""StrategyWrapper: a wrapper is never bypassed."""

import torch

from feddiff.algorithms import Strategy, StrategyWrapper, strategy_from
from feddiff.algorithms.fedavg import FedAvgConfig
from feddiff.algorithms.unet_split import UDecConfig


def test_every_strategy_method_is_delegated_explicitly():
    # a method added to Strategy but not to StrategyWrapper would return the base default, not the inner's
    public = {n for n, v in vars(Strategy).items() if callable(v) and not n.startswith("_")}
    assert public <= set(vars(StrategyWrapper)), sorted(public - set(vars(StrategyWrapper)))


def test_writes_through_a_wrapper_reach_the_inner_strategy():
    inner = strategy_from(UDecConfig(), 2, 0)
    w = StrategyWrapper(inner)
    w.initialize({"up_blocks.0.w": torch.zeros(1)})
    w.global_model = {"up_blocks.0.w": torch.ones(1)}
    assert torch.equal(w.global_state()["up_blocks.0.w"], torch.ones(1))
    assert w.personalized and w.shared == ("decoder",) and w.inner is inner
    w.initialized = {1}
    assert inner.initialized == {1}
    plain = StrategyWrapper(strategy_from(FedAvgConfig(), 2, 0))
    assert not plain.personalized and plain.needs == ()
