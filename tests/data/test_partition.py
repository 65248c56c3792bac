import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feddiff.data.partition import (
    PartitionError, dirichlet, iid, label_histograms, make_partition, partition_hash, pathological, quantity,
)

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 100 per class


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


def entropy(hist):
    p = hist / hist.sum(1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1))).sum(1)


def test_iid_equal_sizes_and_cover():
    parts = iid(LABELS, 3, seed=0)
    assert [len(p) for p in parts] == [334, 333, 333]
    assert_exact_cover(parts, 1000)


@pytest.mark.parametrize("fn", [iid, dirichlet, quantity])
def test_seeded_and_reproducible(fn):
    a, b, c = fn(LABELS, 5, seed=1), fn(LABELS, 5, seed=1), fn(LABELS, 5, seed=2)
    assert partition_hash(a) == partition_hash(b)
    assert partition_hash(a) != partition_hash(c)


def test_dirichlet_covers_min_size_and_is_skewed():
    parts = dirichlet(LABELS, 5, seed=0, alpha=0.1, min_samples=10)
    assert_exact_cover(parts, 1000)
    assert min(len(p) for p in parts) >= 10
    # label skew is measurable: per-client label entropy far below IID's log(10)
    skewed = entropy(label_histograms(LABELS, parts, 10)).mean()
    flat = entropy(label_histograms(LABELS, iid(LABELS, 5, 0), 10)).mean()
    assert flat > 2.2 and skewed < 1.6


def test_dirichlet_skew_grows_as_alpha_shrinks():
    ent = [entropy(label_histograms(LABELS, dirichlet(LABELS, 10, seed=s, alpha=a), 10)).mean()
           for a in (100.0, 1.0, 0.1) for s in (0,)]
    assert ent[0] > ent[1] > ent[2]


def test_dirichlet_impossible_min_size_is_clear():
    with pytest.raises(PartitionError, match="cannot give 20 clients at least 60"):
        dirichlet(LABELS, 20, seed=0, min_samples=60)


@pytest.mark.parametrize("num_clients", [3, 5, 10])
def test_dirichlet_tiny_alpha_is_well_defined(num_clients):
    # alpha=0.001 puts (nearly) all of a class's mass on one client; when that client is already
    # full the proportions used to be 0/0 = NaN and the class went to a client beyond its cap
    cap = len(LABELS) / num_clients
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(5):
            parts = dirichlet(LABELS, num_clients, seed=seed, alpha=0.001, min_samples=1)
            assert_exact_cover(parts, 1000)
            hist = label_histograms(LABELS, parts, 10)
            # classes are dealt in order 0..9: a client holding >= N/K samples gets no later class
            held_before = np.cumsum(hist, 1) - hist
            assert not ((held_before >= cap) & (hist > 0)).any(), (seed, hist)


def test_quantity_sizes_skewed_labels_mixed():
    parts = quantity(LABELS, 5, seed=0, alpha=0.5, min_samples=10)
    assert_exact_cover(parts, 1000)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 10 and sizes[-1] > 2 * sizes[0]


def test_pathological_random_k_classes_each():
    parts = pathological(LABELS, 10, seed=0, classes_per_client=2)
    hist = label_histograms(LABELS, parts, 10)
    assert ((hist > 0).sum(1) <= 2).all() and ((hist > 0).sum(1) >= 1).all()
    assert (hist[:, :][np.arange(10), np.arange(10)] > 0).all()  # client i holds class i mod 10
    assert_exact_cover(parts, 1000)


def test_pathological_fedphd_rule_hand_computed():
    # FedPhD CIFAR-10 setting: 20 clients, 2 classes each -> 4 shards per class,
    # shard j of class i to client (4i + j) % 20: clients 0-3 hold {0, 5}, 4-7 {1, 6}, ...
    labels = np.repeat(np.arange(10), 40)
    parts = pathological(labels, 20, seed=0, classes_per_client=2, shard_rule="fedphd")
    hist = label_histograms(labels, parts, 10)
    for client in range(20):
        g = client // 4
        assert set(np.flatnonzero(hist[client])) == {g, g + 5}
        assert hist[client, g] == 10 and hist[client, g + 5] == 10
    assert_exact_cover(parts, 400)


def test_pathological_warns_about_unused_classes():
    with pytest.warns(UserWarning, match=r"leaves 700 of 1000 samples unused: no client drew classes "
                      r"\[3, 4, 5, 6, 7, 8, 9\]"):
        parts = pathological(LABELS, 3, seed=0, classes_per_client=1)
    assert [np.unique(LABELS[p]).tolist() for p in parts] == [[0], [1], [2]]
    assert [len(p) for p in parts] == [100, 100, 100]  # behaviour kept: whole classes, nothing else
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class drawn: no warning
        assert_exact_cover(pathological(LABELS, 10, seed=0, classes_per_client=2), 1000)
        assert_exact_cover(pathological(LABELS, 5, seed=0, classes_per_client=2, shard_rule="fedphd"), 1000)


def test_pathological_bad_k():
    with pytest.raises(PartitionError, match="classes_per_client must be in"):
        pathological(LABELS, 4, seed=0, classes_per_client=11)


def test_make_partition_unknown_method_lists_valid():
    with pytest.raises(PartitionError, match=r"choose from \['dirichlet', 'iid', 'pathological', 'quantity'\]"):
        make_partition("shards", LABELS, 2, 0)


@settings(max_examples=25, deadline=None)
@given(n_clients=st.integers(1, 12), seed=st.integers(0, 2**31), method=st.sampled_from(["iid", "dirichlet", "quantity"]),
       alpha=st.floats(0.3, 5.0))
def test_property_every_index_exactly_once(n_clients, seed, method, alpha):
    parts = make_partition(method, LABELS, n_clients, seed, alpha=alpha, min_samples=5)
    assert len(parts) == n_clients
    assert_exact_cover(parts, 1000)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates


# -- the data split's seed: partition.seed, or run.seed when unset ---------------------------------


def _split_config(**partition):
    from feddiff.config import config_from_dict

    return config_from_dict({"run": {"seed": 3}, "data": {"max_train_samples": 600},
                             "partition": {"method": "dirichlet", "num_clients": 4, **partition}})


def test_partition_seed_none_is_the_run_seed_split():
    from feddiff.engines.experiment import partition_train
    from feddiff.seeding import derive_seed, numpy_rng

    subset, parts = partition_train(_split_config(), LABELS)
    # today's split, written out: the subset and the partition both from run.seed = 3
    expected_subset = np.sort(numpy_rng(3, "train-subset").choice(1000, 600, replace=False))
    expected = make_partition("dirichlet", LABELS[expected_subset], 4, derive_seed(3, "partition"),
                              alpha=0.5, min_samples=10)
    assert np.array_equal(subset, expected_subset)
    assert partition_hash(parts) == partition_hash([expected_subset[p] for p in expected])


def test_partition_seed_fixes_the_split_whatever_the_run_seed():
    from feddiff.config import config_from_dict
    from feddiff.engines.experiment import partition_train, train_subset

    def split(run_seed, part_seed):
        cfg = config_from_dict({"run": {"seed": run_seed}, "data": {"max_train_samples": 600},
                                "partition": {"method": "dirichlet", "num_clients": 4, "seed": part_seed}})
        subset, parts = partition_train(cfg, LABELS)
        return subset, partition_hash(parts), train_subset(cfg, 1000)

    a, b, c = split(3, 7), split(4, 7), split(3, 8)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]  # same partition.seed: same subset and parts
    assert np.array_equal(a[0], a[2])
    assert not np.array_equal(a[0], c[0]) and a[1] != c[1]  # another partition.seed: another split
    # an explicit partition.seed equal to run.seed is the unset one
    none = partition_train(_split_config(), LABELS)
    same = partition_train(_split_config(seed=3), LABELS)
    assert partition_hash(none[1]) == partition_hash(same[1])


def test_partition_record_names_the_seed_used():
    import torch

    from feddiff.data.sources import ImageData
    from feddiff.engines.experiment import partition_record, partition_train

    images = torch.zeros(1000, 1, 2, 2, dtype=torch.uint8)
    train = ImageData("x", "train", images, torch.from_numpy(LABELS), [str(i) for i in range(10)])
    for cfg, seed in ((_split_config(), 3), (_split_config(seed=7), 7)):
        _, parts = partition_train(cfg, LABELS)
        rec = partition_record(cfg, train, parts)
        assert rec["seed"] == seed and rec["hash"] == partition_hash(parts)
        assert rec["unused_samples"] == 0 and sum(rec["sizes"]) == 600


def test_fedphd_proportional_split_by_hand():
    from feddiff.data.partition import make_partition, proportional_clients

    # 4 classes of 50, 30, 15, 5 over 10 clients: ceil(5, 3, 1.5, 0.5) = 5, 3, 2, 1 = 11 -> the largest gives one
    assert proportional_clients(np.array([50, 30, 15, 5]), 10) == [4, 3, 2, 1]
    labels = np.repeat([0, 1, 2, 3], [50, 30, 15, 5])
    parts = make_partition("pathological", labels, 10, 0, classes_per_client=1, shard_rule="fedphd-proportional")
    assert [len(np.unique(labels[p])) for p in parts] == [1] * 10
    assert [int(labels[p[0]]) for p in parts] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
    assert sorted(len(p) for p in parts[:4]) == [12, 12, 13, 13] and sum(len(p) for p in parts) == 100
    with pytest.raises(Exception, match="classes_per_client must be 1"):
        make_partition("pathological", labels, 10, 0, classes_per_client=2, shard_rule="fedphd-proportional")
