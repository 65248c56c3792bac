"""QualityMetrics and reference features: agreement with the pure math, caching, federated stats,
and behaviour on real vs corrupted images (with a seeded, untrained domain net as the extractor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feddiff.metrics.features import build_domain_net
from feddiff.metrics.fid import (
    FeatureStats,
    frechet_distance_from_stats,
    inception_score,
    mmd2_unbiased_poly,
)
from feddiff.metrics.quality import (
    QualityMetrics,
    equal_split_inception_score,
    extract_features,
    federated_reference_stats,
    load_stats,
    reference_features,
    save_stats,
)
from feddiff.seeding import global_rng
from tests.conftest import synthetic_images


@pytest.fixture(scope="module")
def net():
    return build_domain_net(1, 28, 10, seed=0).eval()


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    train, _ = synthetic_images(300, 0)
    test, _ = synthetic_images(120, 1)
    return {"train": torch.from_numpy(train).unsqueeze(1), "test": torch.from_numpy(test).unsqueeze(1)}


def to_sampler_range(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


def test_compute_fd_equals_frechet_distance_on_same_features(net, data) -> None:
    real = extract_features(net, data["train"])
    fake = to_sampler_range(data["test"])
    out = QualityMetrics(net, real).compute(fake)
    fake_feats = extract_features(net, (fake + 1) / 2)
    expected = frechet_distance_from_stats(FeatureStats.from_features(real), FeatureStats.from_features(fake_feats))
    assert out["fd"] == pytest.approx(expected, rel=1e-6)
    assert out["label"] == "FD-domain" and out["feature_net"] == "domain"
    assert (out["num_real"], out["num_fake"]) == (300, 120)


def test_kid_and_is_agree_with_pure_functions(net, data) -> None:
    # subsets as large as both sets hold every sample, so each torchmetrics subset is all of them
    real = extract_features(net, data["train"][:100])
    fake = to_sampler_range(data["test"][:100])
    out = QualityMetrics(net, real, kid_subsets=3, is_splits=1).compute(fake)
    fake_feats, logits = extract_features(net, (fake + 1) / 2, with_logits=True)
    assert out["kid_mean"] == pytest.approx(mmd2_unbiased_poly(real.astype(np.float64), fake_feats.astype(np.float64)),
                                            rel=1e-6, abs=1e-12)
    assert out["kid_std"] == pytest.approx(0, abs=1e-12)
    assert out["is_mean"] == pytest.approx(inception_score(logits, 1)[0], rel=1e-9) and out["is_std"] == 0.0
    assert (out["kid_subsets"], out["kid_subset_size"], out["is_splits"]) == (3, 100, 1)  # the protocol as it ran
    assert (out["is_split_size"], out["is_left_out"]) == (100, 0)


def test_generated_images_are_scored_at_8_bits(net, data) -> None:
    qm = QualityMetrics(net, extract_features(net, data["train"]), kid_subsets=2)
    fake = to_sampler_range(data["test"][:40])
    nudged = fake + (torch.rand(fake.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * (0.9 / 127.5)
    assert not torch.equal(fake, nudged) and qm.compute(nudged) == qm.compute(fake)  # same PNG, same score


def test_compute_is_deterministic_and_validates(net, data) -> None:
    qm = QualityMetrics(net, extract_features(net, data["train"]), kid_subsets=5)
    fake = to_sampler_range(data["test"][:40])
    assert qm.compute(fake) == qm.compute(fake)
    with pytest.raises(ValueError, match="float images"):
        qm.compute(data["test"])  # uint8, not the sampler's floats
    with pytest.raises(ValueError, match="at least 2 generated images"):
        qm.compute(fake[:1])
    with pytest.raises(ValueError, match="dimension 5"):
        QualityMetrics(net, np.zeros((10, 5)))


def test_behaviour_real_vs_noise_and_corruption(net, data) -> None:
    qm = QualityMetrics(net, extract_features(net, data["train"]), kid_subsets=10)
    real = data["test"].float() / 255
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    scores = [qm.compute(((1 - a) * real + a * noise) * 2 - 1) for a in (0.0, 0.25, 0.5, 1.0)]
    fds = [s["fd"] for s in scores]
    assert fds == sorted(fds) and fds[0] < 0.05 * fds[-1]  # train vs test is small, vs noise large
    kids = [s["kid_mean"] for s in scores]
    assert abs(kids[0]) < 0.01 * kids[-1]  # real vs real: KID near zero
    assert kids[1:] == sorted(kids[1:])


def test_federated_stats_give_the_pooled_fd(net, data) -> None:
    train = data["train"]
    clients = [train[:70], train[70:200], train[200:]]
    fed = federated_reference_stats(clients, net)
    pooled = FeatureStats.from_features(extract_features(net, train))
    assert fed.n == pooled.n == 300
    np.testing.assert_allclose(fed.outer, pooled.outer, rtol=1e-10, atol=1e-12)
    fake = to_sampler_range(data["test"])
    fake_stats = FeatureStats.from_features(extract_features(net, (fake + 1) / 2))
    assert frechet_distance_from_stats(fed, fake_stats) == pytest.approx(
        frechet_distance_from_stats(pooled, fake_stats), rel=1e-6)  # sums in another order: round-off
    from_stats = QualityMetrics(net, fed).compute(fake)
    from_feats = QualityMetrics(net, extract_features(net, train)).compute(fake)
    assert from_stats["fd"] == pytest.approx(from_feats["fd"], rel=1e-8)
    assert "kid_mean" not in from_stats and "kid_mean" in from_feats  # KID needs the features
    with pytest.raises(ValueError, match="no client image sets"):
        federated_reference_stats([], net)


def test_stats_npz_round_trip(tmp_path: Path) -> None:
    stats = FeatureStats.from_features(np.random.default_rng(0).normal(size=(20, 4)))
    back = load_stats(save_stats(tmp_path / "s" / "ref.npz", stats))
    assert back.n == 20 and np.array_equal(back.sum, stats.sum) and np.array_equal(back.outer, stats.outer)


def test_reference_features_cached_by_key(net, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = {"dataset": "fashion-mnist", "split": "train", "image_size": 28, "resize": "pad"}
    first = reference_features(net, data["train"], cache_dir=tmp_path, key=key)
    files = list((tmp_path / "reference").glob("domain-*.npz"))
    assert len(files) == 1 and first.shape == (300, 128) and first.dtype == np.float32
    with np.load(files[0]) as z:
        assert '"split": "train"' in str(z["key"]) and '"num_images": 300' in str(z["key"])

    calls = []
    import feddiff.metrics.quality as quality

    monkeypatch.setattr(quality, "extract_features", lambda *a, **k: calls.append(1) or first)
    again = reference_features(net, data["train"], cache_dir=tmp_path, key=key)
    assert calls == [] and np.array_equal(again, first)  # loaded, not recomputed
    reference_features(net, data["train"], cache_dir=tmp_path, key={**key, "split": "test"})
    assert calls == [1] and len(list((tmp_path / "reference").glob("*.npz"))) == 2
    # other images under the same key (another folder, changed files) never get stale features
    reference_features(net, 255 - data["train"], cache_dir=tmp_path, key=key)
    assert calls == [1, 1] and len(list((tmp_path / "reference").glob("*.npz"))) == 3
    with pytest.raises(ValueError, match="JSON"):
        reference_features(net, data["train"], cache_dir=tmp_path, key={"bad": object()})


# ----------------------------------------------------------------------------------------------
# Inception Score over equal splits


def _logits_of(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (each row sums to 1): log-probabilities are such logits."""
    return torch.tensor(probs, dtype=torch.float64).log()


def test_equal_split_is_by_hand() -> None:
    # split 1: p(y|x) = (3/4, 1/4) and (1/4, 3/4), so p(y) = (1/2, 1/2) and each image's
    #   KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 3/4 ln 3 - ln 2, so IS = exp(3/4 ln 3 - ln 2) = 3^(3/4) / 2
    # split 2: two identical images, p(y) = p(y|x), KL = 0, IS = 1
    # a fifth image is the remainder of 5 = 2 * 2 + 1: left out (it would change split 2's score)
    logits = _logits_of([[0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.5], [0.99, 0.01]])
    res = equal_split_inception_score(logits, 2, shuffle=False)
    a, b = 3**0.75 / 2, 1.0
    assert (res.splits, res.split_size, res.left_out) == (2, 2, 1)
    assert res.split_scores == pytest.approx([a, b], rel=1e-12)
    assert res.mean == pytest.approx((a + b) / 2, rel=1e-12)
    assert res.std == pytest.approx(abs(a - b) / 2**0.5, rel=1e-12)  # ddof 1, as torchmetrics
    # one-hot predictions spread evenly over k classes give IS = k
    onehot = _logits_of([[1 - 2e-15, 1e-15, 1e-15], [1e-15, 1 - 2e-15, 1e-15], [1e-15, 1e-15, 1 - 2e-15]])
    assert equal_split_inception_score(onehot, 1, shuffle=False).mean == pytest.approx(3, rel=1e-12)
    # a split of one image: p(y) = p(y|x), KL = 0, IS = 1 (never below 1 by round-off: the KL is clamped at 0)
    for seed in range(20):
        single = equal_split_inception_score(torch.randn(4, 6, generator=torch.Generator().manual_seed(seed)), 4)
        assert single.split_size == 1 and all(1 <= s <= 1 + 1e-6 for s in single.split_scores)


def test_equal_split_is_refuses_fewer_images_than_splits() -> None:
    with pytest.raises(ValueError, match=r"9 images.*splits=10"):
        equal_split_inception_score(torch.randn(9, 5), 10)
    with pytest.raises(ValueError, match="splits"):
        equal_split_inception_score(torch.randn(9, 5), 0)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        equal_split_inception_score(torch.randn(9), 1)


def test_equal_split_is_matches_torchmetrics_when_divisible() -> None:
    import warnings

    from torchmetrics.image.inception import InceptionScore

    from feddiff.metrics.quality import _Passthrough

    logits = torch.randn(40, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=_Passthrough(7), splits=10, normalize=False)
    metric.update(logits)
    with global_rng("cpu", 5, "is"):
        tm_mean, tm_std = metric.compute()  # shuffles with the global RNG
    with global_rng("cpu", 5, "is"):
        ours = equal_split_inception_score(logits, 10)
    assert (ours.splits, ours.split_size, ours.left_out) == (10, 4, 0)
    assert ours.mean == pytest.approx(float(tm_mean), rel=1e-13)
    assert ours.std == pytest.approx(float(tm_std), rel=1e-12)
    # the same permutation from an explicit generator
    again = equal_split_inception_score(logits, 10, generator=torch.Generator().manual_seed(1))
    assert again == equal_split_inception_score(logits, 10, generator=torch.Generator().manual_seed(1))


def test_torchmetrics_chunking_is_what_we_avoid() -> None:
    # Tensor.chunk(10) of 25 rows makes 9 chunks, of 64 rows 10 chunks with a 1-row last one
    assert len(torch.arange(25).chunk(10)) == 9
    assert [len(c) for c in torch.arange(64).chunk(10)][-1] == 1
    for n in (25, 64):
        res = equal_split_inception_score(torch.randn(n, 5, generator=torch.Generator().manual_seed(n)), 10)
        assert (res.splits, res.split_size, res.left_out) == (10, n // 10, n % 10)
        assert len(res.split_scores) == 10 and min(res.split_scores) > 1


def test_quality_metrics_records_the_equal_splits(net, data) -> None:
    fake = to_sampler_range(data["test"][:25])
    out = QualityMetrics(net, extract_features(net, data["train"]), kid_subsets=2, is_splits=10).compute(fake)
    assert (out["is_splits"], out["is_split_size"], out["is_left_out"]) == (10, 2, 5)
    _, logits = extract_features(net, (fake + 1) / 2, with_logits=True)
    with global_rng("cpu", 0, "is"):  # QualityMetrics' seed 0
        expected = equal_split_inception_score(torch.from_numpy(logits).to(torch.float64), 10)
    assert (out["is_mean"], out["is_std"]) == (expected.mean, expected.std)
    # fewer images than splits: the splits are capped at the number of images, one image each
    few = QualityMetrics(net, extract_features(net, data["train"]), kid_subsets=2, is_splits=10).compute(fake[:6])
    assert (few["is_splits"], few["is_split_size"], few["is_left_out"]) == (6, 1, 0)
    assert few["is_mean"] == pytest.approx(1.0, abs=1e-12) and few["is_mean"] >= 1.0 and few["is_std"] < 1e-12
