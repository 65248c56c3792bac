import torch

from feddiff.algorithms import Reply, strategy_from as make_strategy
from feddiff.algorithms.fedavg import FedAvgConfig


def test_fedavg_round_hand_computed():
    s = make_strategy(FedAvgConfig(), num_clients=3, seed=0)
    s.initialize({"w": torch.zeros(2)})
    tasks = s.configure(0)
    assert [t.client for t in tasks] == [0, 1, 2]
    assert tasks[0].config == {"round": 0, "upload": "all"}
    assert torch.equal(tasks[0].tensors["w"], torch.zeros(2))
    replies = [Reply(0, {"w": torch.tensor([1.0, 0.0])}, 10), Reply(1, {"w": torch.tensor([0.0, 1.0])}, 30),
               Reply(2, {"w": torch.tensor([2.0, 2.0])}, 60)]
    s.aggregate(0, replies)
    assert torch.allclose(s.global_state()["w"], torch.tensor([0.1 + 1.2, 0.3 + 1.2]))


def test_initialize_copies_and_state_roundtrip():
    init = {"w": torch.ones(3)}
    s = make_strategy(FedAvgConfig(), 2, 0)
    s.initialize(init)
    init["w"].zero_()
    assert s.global_state()["w"].sum() == 3
    tensors, meta = s.state_dict()
    t = make_strategy(FedAvgConfig(), 2, 0)
    t.load_state_dict(tensors, meta)
    assert torch.equal(t.global_state()["w"], s.global_state()["w"])


def test_client_sampling_fraction_seeded():
    s = make_strategy(FedAvgConfig(fraction=0.4), num_clients=10, seed=7)
    picks = [s.sample_clients(r) for r in range(20)]
    assert all(len(p) == 4 and p == sorted(set(p)) for p in picks)
    assert picks == [make_strategy(FedAvgConfig(fraction=0.4), 10, 7).sample_clients(r) for r in range(20)]
    assert len({tuple(p) for p in picks}) > 10  # rounds differ
    assert make_strategy(FedAvgConfig(fraction=0.05, min_clients=2), 10, 0).sample_clients(0).__len__() == 2
