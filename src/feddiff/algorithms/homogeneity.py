"""FedPhD's homogeneity-aware rules as pure functions over label distributions (no I/O, no engine types).

Long, Wang, Anagnostopoulos, Bi, "FedPhD: Federated Pruning with Hierarchical Learning of Diffusion
Models" (2025, https://arxiv.org/abs/2507.06449), as read from the authors' code (client.py
``select_best_edge_server``, fedphd_api.py ``_aggregate_server``; shared/reference/papers.md 1.2-1.5):

- homogeneity score        HS(q) = 2 - ||p* - q||_2                   (p*: uniform over classes by default)
- merged distribution      q_{e,k} = (n_e q_e + n_k p_k) / (n_e + n_k)
- edge selection           r_e = max(c HS(q_{e,k}) - n_e + b, 0) + eps,   P(e) = r_e / sum r
- central weights          lambda_e = max(N_e + a HS(q_e) + b, 0),        normalised
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def uniform_target(num_classes: int) -> np.ndarray:
    """p*: the uniform distribution over ``num_classes`` classes."""
    if num_classes < 1:
        raise ValueError(f"a target distribution needs at least one class, got {num_classes}")
    return np.full(num_classes, 1.0 / num_classes)


def distribution(counts: Sequence[float]) -> np.ndarray:
    """Label counts -> a distribution (counts / their sum); all-zero counts are refused."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or (c < 0).any() or not np.isfinite(c).all():
        raise ValueError(f"label counts must be a 1-d list of finite counts >= 0, got {c.tolist()}")
    total = c.sum()
    if total <= 0:
        raise ValueError("label counts sum to 0: a client with no samples has no distribution")
    return c / total


def homogeneity_score(q: np.ndarray, target: np.ndarray) -> float:
    """HS(q) = 2 - ||target - q||_2, in [2 - sqrt(2), 2] for distributions."""
    q, target = np.asarray(q, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if q.shape != target.shape:
        raise ValueError(f"distribution over {q.shape[0]} classes vs a target over {target.shape[0]}")
    return float(2.0 - np.sqrt(np.sum((target - q) ** 2)))


def merge(q_e: np.ndarray, n_e: float, p_k: np.ndarray, n_k: float) -> tuple[np.ndarray, float]:
    """The edge's distribution and sample count after adding a client: ((n_e q_e + n_k p_k)/(n_e + n_k), n_e + n_k)."""
    n = n_e + n_k
    if n <= 0:
        return np.asarray(q_e, dtype=np.float64).copy(), float(n)
    return (n_e * np.asarray(q_e, dtype=np.float64) + n_k * np.asarray(p_k, dtype=np.float64)) / n, float(n)


def selection_probabilities(
    q_edges: Sequence[np.ndarray], n_edges: Sequence[float], p_k: np.ndarray, n_k: float, target: np.ndarray,
    c: float = 10000.0, b: float = 0.0, eps: float = 1e-8,
) -> np.ndarray:
    """P(edge e) for one client: r_e = max(c HS(merge(q_e, n_e; p_k, n_k)) - n_e + b, 0) + eps, normalised.

    Parameters
    ----------
    q_edges, n_edges
        Each edge's running label distribution and sample count since the last central aggregation
        (the same snapshot for every client of a round).
    p_k, n_k
        The client's label distribution and sample count.
    c, b, eps
        The authors' constants (10000, 0, 1e-8).
    """
    r = []
    for q_e, n_e in zip(q_edges, n_edges):
        merged, _ = merge(q_e, n_e, p_k, n_k)
        r.append(max(c * homogeneity_score(merged, target) - n_e + b, 0.0) + eps)
    r_arr = np.asarray(r, dtype=np.float64)
    return r_arr / r_arr.sum()


def central_weights(
    samples: Sequence[float], q_edges: Sequence[np.ndarray], target: np.ndarray, a: float, b: float = 0.0,
) -> np.ndarray:
    """lambda_e = max(N_e + a HS(q_e) + b, 0), normalised; a = 0 is sample-weighted HierFAVG.

    All-zero weights (every edge clipped to 0) are refused with the values that caused it.
    """
    lam = np.array([max(n + a * homogeneity_score(q, target) + b, 0.0) for n, q in zip(samples, q_edges)])
    if lam.sum() <= 0:
        raise ValueError(f"every central weight is 0 (N_e {list(samples)}, a {a}, b {b}); nothing to aggregate")
    return lam / lam.sum()
