"""FedPhD: Long, Wang, Anagnostopoulos, Bi, "FedPhD: Federated Pruning with Hierarchical Learning of
Diffusion Models" (2025, https://arxiv.org/abs/2507.06449), as read from the authors' code
(shared/reference/papers.md section 1).

FedPhD is the hierarchy of ``hierarchical.py`` with its two homogeneity-aware rules (``homogeneity.py``):
each sampled client draws its edge from P(e) proportional to max(c HS(merge(q_e, n_e; p_k, n_k)) - n_e
+ b, 0) + eps, and the central server weights edge e by max(N_e + a HS(q_e) + b, 0). Structured pruning
of the U-Net (the paper's other half) comes with ``prune/``.
"""

from __future__ import annotations

from typing import Literal

from feddiff.algorithms.hierarchical import HierFAVGConfig, Hierarchical
from feddiff.algorithms.registry import Algorithm, register
from feddiff.config import F


class FedPhDConfig(HierFAVGConfig):
    """FedPhD's hierarchy (Long et al. 2025): homogeneity-aware edge selection and central weights."""

    name: Literal["fedphd"] = F("fedphd", "algorithm: fedphd")  # type: ignore[assignment]
    selection: Literal["homogeneity", "random", "round-robin", "fixed"] = F(
        "homogeneity", "client -> edge each round (FedPhD: homogeneity)")
    central_a: float = F(50000.0, "central weights max(N_e + a*HS(q_e) + b, 0): a (authors: CIFAR-10 50000, "
                         "CelebA 20000)")


class FedPhD(Hierarchical):
    """The hierarchy with FedPhD's defaults (the rules are the config's: homogeneity selection, a > 0)."""


register(Algorithm("fedphd", FedPhDConfig, FedPhD))
