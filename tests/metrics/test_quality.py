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
    extract_features,
    federated_reference_stats,
    load_stats,
    reference_features,
    save_stats,
)
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
