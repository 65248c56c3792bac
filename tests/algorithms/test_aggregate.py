import pytest
import torch

from feddiff.algorithms.aggregate import AggregationError, weighted_mean


def test_weighted_mean_hand_computed():
    # Prepare: two clients with weights 1 and 2 -> (a*1 + b*2) / 3
    a = {"w": torch.tensor([1.0, 4.0]), "b": torch.tensor([[3.0]])}
    b = {"w": torch.tensor([4.0, 1.0]), "b": torch.tensor([[0.0]])}
    # Execute
    out = weighted_mean([a, b], [1, 2])
    # Assert
    assert torch.allclose(out["w"], torch.tensor([3.0, 2.0]))
    assert torch.allclose(out["b"], torch.tensor([[1.0]]))


def test_three_clients_sample_counts():
    states = [{"x": torch.tensor([float(v)])} for v in (10, 20, 40)]
    out = weighted_mean(states, [100, 300, 600])
    assert out["x"].item() == pytest.approx((10 * 100 + 20 * 300 + 40 * 600) / 1000)


def test_inputs_untouched_and_integers_kept():
    a = {"w": torch.ones(2), "n": torch.tensor(5)}
    b = {"w": torch.zeros(2), "n": torch.tensor(5)}
    out = weighted_mean([a, b], [1, 1])
    assert torch.equal(a["w"], torch.ones(2)) and out["n"].item() == 5


@pytest.mark.parametrize(
    "states,weights,msg",
    [
        ([], [], "no replies"),
        ([{"w": torch.ones(1)}], [0], "sum to 0"),
        ([{"w": torch.ones(1)}], [-1], ">= 0"),
        ([{"w": torch.ones(1)}, {"v": torch.ones(1)}], [1, 1], "different tensors"),
        ([{"w": torch.ones(1)}, {"w": torch.ones(2)}], [1, 1], "shape"),
    ],
)
def test_errors(states, weights, msg):
    with pytest.raises(AggregationError, match=msg):
        weighted_mean(states, weights)
