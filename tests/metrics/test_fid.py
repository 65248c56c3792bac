"""Fréchet distance, FeatureStats, KID and IS against closed forms, hand computations and torchmetrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from feddiff.metrics.fid import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    kernel_inception_distance,
    mmd2_unbiased_poly,
)


def random_psd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def test_fd_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_commuting_full_covariances_closed_form() -> None:
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so Tr (S1 S2)^(1/2) = sum sqrt(a b)
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 2, size=6), rng.uniform(0.1, 2, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_one_dimensional_by_hand() -> None:
    # N(1, 4) vs N(3, 1): (1 - 3)^2 + (2 - 1)^2 = 5
    assert frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(5.0, abs=1e-12)


def test_fd_general_matches_eigvals_of_product_and_is_symmetric() -> None:
    rng = np.random.default_rng(2)
    s1, s2 = random_psd(rng, 10), random_psd(rng, 10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()  # torchmetrics' formula
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_fd_identical_is_zero_even_rank_deficient() -> None:
    rng = np.random.default_rng(3)
    s, mu = random_psd(rng, 32), rng.normal(size=32)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    # rank 5 of 32: the 27 zero eigenvalues carry round-off ~1e-15, and their square roots ~3e-8
    # each; that sqrt(eps) error is inherent to any matrix square root at a singular matrix
    s = random_psd(rng, 32, 5)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-5
    s1, s2 = random_psd(rng, 32, 4), random_psd(rng, 32, 6)
    assert frechet_distance(np.zeros(32), s1, np.zeros(32), s2) > 0


def test_fd_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance([np.nan], [[1.0]], [0.0], [[1.0]])


# ----------------------------------------------------------------------------------------------
# FeatureStats: what clients send in federated evaluation


def test_feature_stats_merge_equals_pooled() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 1.5, size=(300, 16))
    chunks = [x[:50], x[50:170], x[170:]]
    merged = FeatureStats.from_features(chunks[0]) + FeatureStats.from_features(chunks[1])
    merged = merged.merge(FeatureStats.from_features(torch.from_numpy(chunks[2])))
    pooled = FeatureStats.from_features(x)
    assert merged.n == pooled.n == 300
    np.testing.assert_allclose(merged.sum, pooled.sum, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.outer, pooled.outer, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.mean(), x.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    y = rng.normal(size=(100, 16))
    assert frechet_distance_from_stats(merged, FeatureStats.from_features(y)) == pytest.approx(
        frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)), rel=1e-10)
    assert (FeatureStats.zeros(16) + pooled).n == 300


def test_feature_stats_errors() -> None:
    one = FeatureStats.from_features(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        one.cov()
    with pytest.raises(ValueError, match="dimension 3 and 4"):
        one.merge(FeatureStats.zeros(4))
    with pytest.raises(ValueError, match="2-d"):
        FeatureStats.from_features(np.ones(3))


# ----------------------------------------------------------------------------------------------
# KID


def test_mmd_by_hand() -> None:
    # x = {0, 1}, y = {2, 3}, d = 1, k(a, b) = (ab + 1)^3:
    # within x: 2 k(0,1) = 2; within y: 2 k(2,3) = 686; over m(m-1) = 2 -> 344
    # cross: k(0,2) + k(0,3) + k(1,2) + k(1,3) = 1 + 1 + 27 + 64 = 93; 2 * 93 / 4 = 46.5
    assert mmd2_unbiased_poly(np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])) == pytest.approx(297.5)


def test_mmd_matches_torchmetrics_poly_mmd() -> None:
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 8)), rng.normal(0.3, 1, size=(40, 8))
    ref = float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))
    assert mmd2_unbiased_poly(x, y) == pytest.approx(ref, rel=1e-10)


def test_kid_same_distribution_near_zero_and_unbiased() -> None:
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    mean, std = kernel_inception_distance(real, fake, num_subsets=20, subset_size=100, seed=0)
    assert abs(mean) < std
    # unbiased: the average over many independent small samples is 0 within its standard error
    est = [mmd2_unbiased_poly(rng.normal(size=(10, 4)), rng.normal(size=(10, 4))) for _ in range(400)]
    assert abs(np.mean(est)) < 4 * np.std(est) / np.sqrt(len(est))
    assert min(est) < 0 < max(est)  # an unbiased estimator of 0 must go negative sometimes


def test_kid_grows_with_mean_shift_and_is_seeded() -> None:
    rng = np.random.default_rng(7)
    real, noise = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    kids = [kernel_inception_distance(real, noise + shift, 10, 100, seed=0)[0] for shift in (0.0, 0.5, 1.0, 2.0)]
    assert kids == sorted(kids) and kids[-1] > 10 * abs(kids[0])
    assert kernel_inception_distance(real, noise, 5, 50, seed=3) == kernel_inception_distance(real, noise, 5, 50, seed=3)


def test_kid_argument_errors() -> None:
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match=r"subset_size=11 must be in \[2, min\(N_real, N_fake\)\] = \[2, 10\]"):
        kernel_inception_distance(x, x, 1, 11)
    with pytest.raises(ValueError, match="feature dims differ"):
        kernel_inception_distance(x, np.zeros((10, 3)), 1, 5)


# ----------------------------------------------------------------------------------------------
# Inception Score


def test_is_uniform_predictions_is_one() -> None:
    assert inception_score(np.zeros((20, 10)), splits=2) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_is_confident_evenly_spread_is_k() -> None:
    k = 7
    logits = 60.0 * np.eye(k)[np.arange(4 * k) % k]  # each class predicted with p ~ 1, equally often
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    # one class only: p(y|x) = p(y), no information -> 1
    assert inception_score(60.0 * np.eye(k)[np.zeros(10, dtype=int)], splits=1)[0] == pytest.approx(1.0)


def test_is_matches_torchmetrics_with_one_split() -> None:
    from torchmetrics.image.inception import InceptionScore

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    logits = np.random.default_rng(8).normal(0, 3, size=(50, 12))
    with pytest.warns(UserWarning):
        metric = InceptionScore(feature=Identity(), splits=1)
    metric.update(torch.from_numpy(logits))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' std over one split warns
        tm_mean = float(metric.compute()[0])
    assert inception_score(logits, splits=1)[0] == pytest.approx(tm_mean, rel=1e-10)
    with pytest.raises(ValueError, match="splits=51"):
        inception_score(logits, splits=51)


# ----------------------------------------------------------------------------------------------
# Cross-check with torchmetrics' FID


def test_fd_matches_torchmetrics_fid_on_same_features() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 12

        def forward(self, x):
            return x

    rng = np.random.default_rng(9)
    real = rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12))
    fake = rng.normal(0.5, 1.2, size=(50, 12)) @ rng.normal(size=(12, 12))
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    ours = frechet_distance_from_stats(FeatureStats.from_features(real), FeatureStats.from_features(fake))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-8)
