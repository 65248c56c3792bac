"""Pure math of the image-quality metrics: Fréchet distance, KID, Inception Score; no I/O.

- FD / FID: Heusel et al. 2017, https://arxiv.org/abs/1706.08500 -- the Fréchet distance between
  Gaussians fitted to two sets of features, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- KID: Binkowski et al. 2018, https://arxiv.org/abs/1801.01401 -- the unbiased MMD^2 with the
  cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
- IS: Salimans et al. 2016, https://arxiv.org/abs/1606.03498 -- exp E_x KL(p(y|x) || p(y)).

:class:`FeatureStats` holds the sufficient statistics of the Fréchet distance as sums (count, sum
of x, sum of x x^T). Sums add, so in federated evaluation each client sends the FeatureStats of
its own real images and the server's sum is exactly the statistics of the pooled images, without
any image or feature leaving a client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_float64(x, what: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{what}: expected a {ndim}-d array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return arr


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of a feature set: count ``n``, ``sum`` (D,), ``outer`` = sum x x^T (D, D).

    All float64. ``a + b`` (or ``a.merge(b)``) is the statistics of the union of the two sets.
    """

    n: float
    sum: np.ndarray
    outer: np.ndarray

    def __post_init__(self) -> None:
        d = self.sum.shape[0]
        assert self.sum.shape == (d,) and self.outer.shape == (d, d), (self.sum.shape, self.outer.shape)

    @classmethod
    def from_features(cls, feats) -> FeatureStats:
        """Statistics of features (N, D) (numpy array or torch tensor)."""
        x = _as_float64(feats, "FeatureStats.from_features", 2)
        return cls(float(x.shape[0]), x.sum(axis=0), x.T @ x)

    @classmethod
    def zeros(cls, dim: int) -> FeatureStats:
        return cls(0.0, np.zeros(dim), np.zeros((dim, dim)))

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both feature sets together."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dimension {self.dim} and {other.dim}")
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    __add__ = merge

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("FeatureStats.mean: no samples (n = 0)")
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1, as pytorch-fid and torchmetrics do)."""
        if self.n < 2:
            raise ValueError(f"FeatureStats.cov: need at least 2 samples, got n = {self.n:g}")
        mu = self.mean()
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2  # exact symmetry for the eigen-solvers downstream


def label_weights(labels, target) -> np.ndarray:
    """Row weights that give class c the share ``target[c]`` of a labelled set: ``N * target[c] / count[c]``
    for a row of class c (they sum to N; a class the target does not hold weighs nothing). A class with
    ``target[c] > 0`` and no row is an error."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(target, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any() or p.sum() <= 0 or (y.size and (y.min() < 0 or y.max() >= p.size)):
        raise ValueError(f"reweighted_stats: target must be a non-negative vector with a positive sum and one "
                         f"entry per class of the labels (0..{int(y.max()) if y.size else -1}), got {p.tolist()}")
    counts = np.bincount(y, minlength=p.size).astype(np.float64)
    missing = [c for c in range(p.size) if p[c] > 0 and counts[c] == 0]
    if missing:
        raise ValueError(f"reweighted_stats: classes {missing} have weight in the target but no rows")
    return (y.size * (p / p.sum()) / np.where(counts > 0, counts, 1))[y]


def reweighted_stats(feats, labels, target) -> FeatureStats:
    """Statistics of ``feats`` (N, D) with rows weighted so that class c carries the share ``target[c]``
    (:func:`label_weights`): the reference of one client's own distribution, from a shared labelled split."""
    x = _as_float64(feats, "reweighted_stats", 2)
    if np.shape(labels) != (x.shape[0],):
        raise ValueError(f"reweighted_stats: {x.shape[0]} feature rows but labels of shape {np.shape(labels)}")
    w = label_weights(labels, target)
    xw = x * w[:, None]
    return FeatureStats(float(w.sum()), xw.sum(axis=0), xw.T @ x)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Tr (S1 S2)^(1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (similar to S1 S2, so the same eigenvalues): symmetric
    eigen-solvers are stable where a general square root of S1 S2 can turn complex; negative
    round-off eigenvalues are clamped to 0.

    Parameters
    ----------
    mu1, mu2
        Means (D,).
    sigma1, sigma2
        Covariances (D, D), symmetric positive semi-definite.

    Returns
    -------
    float
        The squared Fréchet distance (what is called FID), >= 0 up to round-off.
    """
    mu1, mu2 = _as_float64(mu1, "mu1", 1), _as_float64(mu2, "mu2", 1)
    s1, s2 = _as_float64(sigma1, "sigma1", 2), _as_float64(sigma2, "sigma2", 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, "
                         f"sigma1 {s1.shape}, sigma2 {s2.shape}")
    root1 = _psd_sqrt((s1 + s1.T) / 2)
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two feature sets."""
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between samples x (m, d) and y (m, d) with k(a, b) = (a.b / d + 1)^3.

    The within-set terms leave out the diagonal (U-statistics); the cross term uses all pairs,
    which is unbiased because x and y are independent (Binkowski et al. 2018, eq. 3 with m = n).
    """
    m, d = x.shape
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    real, fake, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
) -> tuple[float, float]:
    """KID: the mean and standard deviation of :func:`mmd2_unbiased_poly` over random subsets.

    Parameters
    ----------
    real, fake
        Features (N_real, D) and (N_fake, D).
    num_subsets
        How many pairs of subsets to average over.
    subset_size
        Samples per subset, drawn without replacement; must be in [2, min(N_real, N_fake)].
    seed
        Seeds the subset draws (numpy ``default_rng``), so the result is reproducible.

    Returns
    -------
    (mean, std)
        ``std`` is the population standard deviation over subsets (ddof 0), as in Binkowski et
        al.'s code and torchmetrics.
    """
    x, y = _as_float64(real, "real features", 2), _as_float64(fake, "fake features", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kernel_inception_distance: feature dims differ, real {x.shape[1]} vs fake {y.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"kernel_inception_distance: num_subsets must be >= 1, got {num_subsets}")
    if not 2 <= subset_size <= min(len(x), len(y)):
        raise ValueError(f"kernel_inception_distance: subset_size={subset_size} must be in [2, "
                         f"min(N_real, N_fake)] = [2, {min(len(x), len(y))}]")
    rng = np.random.default_rng(seed)
    scores = np.array([
        mmd2_unbiased_poly(x[rng.choice(len(x), subset_size, replace=False)],
                           y[rng.choice(len(y), subset_size, replace=False)])
        for _ in range(num_subsets)
    ])  # fmt: skip
    return float(scores.mean()), float(scores.std())


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) on ``splits`` contiguous chunks of ``logits``.

    Parameters
    ----------
    logits
        Class logits (N, K); softmax is taken here, in float64.
    splits
        Number of chunks (numpy ``array_split``), 1 <= splits <= N; p(y) is each chunk's mean.

    Returns
    -------
    (mean, std)
        Over the chunks; std with ddof 0 as in Salimans et al.'s code. (torchmetrics'
        InceptionScore shuffles first and uses ddof 1.)
    """
    z = _as_float64(logits, "logits", 2)
    if not 1 <= splits <= len(z):
        raise ValueError(f"inception_score: splits={splits} must be in [1, N={len(z)}]")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    scores = []
    for chunk in np.array_split(log_p, splits):
        p = np.exp(chunk)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_py = np.log(p.mean(axis=0))
            # 0 log 0 = 0: a class no image in the chunk predicts contributes nothing
            kl = np.where(p > 0, p * (chunk - log_py), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
