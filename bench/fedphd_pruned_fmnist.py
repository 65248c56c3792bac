"""FedPhD with structured pruning on Fashion-MNIST: dense vs pruned at init vs pruned after sparse training.

FedPhD (Long et al. 2025) prunes the U-Net once: at init in their final scripts (``--train_scratch``), or
after ``st_rounds`` of sparse training with a group-norm regulariser (lambda 1e-5 in their code). All
variants run FedPhD on the same partition, seed and client updates as ``bench/fedphd_fmnist.py`` (10 clients
in FedPhD's 2-class shards, 4 a round, 2 edges, central aggregation every 5 rounds, 30 rounds x 10 local
steps of 32, the ``small`` U-Net at 28 px), at FedPhD's CIFAR-10 ratio 0.2 (GroupNorm groups of 4 and 8
channels: every width drops by 25%, 56% of the MACs):

- ``dense``: no pruning;
- ``init``: pruned before round 1 (magnitude of the random weights: a structured width reduction);
- ``sparse``: 10 rounds with the channel group-norm regulariser at FedPhD's lambda 1e-5, then pruned;
- ``sparse1e-3``: the same with lambda 1e-3, strong enough to move Adam-trained weights.

FD-domain on 500 DDPM-50 samples against the 10k test split after the last (central) round. Prints one
JSON object on its last line: per variant FD-domain, parameters, MACs, bytes per tier and in total;
``ratio`` is the FD of pruning at init over the dense model's.

    python bench/fedphd_pruned_fmnist.py            # ~35 min here
    python bench/fedphd_pruned_fmnist.py --quick    # smoke run (< 30 s with a cached feature net)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _sweep_bench import run_bench_sweep, variant_rows
from fedphd_fmnist import overrides as fedphd_overrides
from fedphd_fmnist import tiers

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fedphd_fmnist.toml"

VARIANTS = {
    "dense": [],
    "init": ["prune.ratio=0.2"],
    "sparse": ["prune.ratio=0.2", "prune.at=10", "prune.sparsity=1e-5"],
    "sparse1e-3": ["prune.ratio=0.2", "prune.at=10", "prune.sparsity=1e-3"],
}


def overrides(quick: bool) -> list[str]:
    """``bench/fedphd_fmnist.py``'s protocol with these variants. The smoke run prunes after 2 of its 5 rounds,
    so its central aggregation comes every 2 rounds (a hierarchy prunes right after a central round)."""
    if not quick:
        return fedphd_overrides(quick, VARIANTS)
    variants = {**VARIANTS, "sparse": ["prune.ratio=0.2", "prune.at=2"],
                "sparse1e-3": ["prune.ratio=0.2", "prune.at=2", "prune.sparsity=1e-3"]}
    return fedphd_overrides(quick, variants) + ["algorithm.central_every=2"]


def main() -> None:
    t = time.perf_counter()
    folder, quick = run_bench_sweep(__doc__, CONFIG, overrides)
    rows = variant_rows(folder)
    base = rows["dense"]
    results = {}
    for name, r in rows.items():
        per_tier = tiers(r["bytes"])
        results[name] = {
            "fd_domain": r.get("fd"), "heldout_loss": r.get("heldout_loss"), "parameters": r.get("parameters"),
            "macs": r.get("macs"), "bytes_per_tier": per_tier, "bytes_total": r["bytes_total"],
            "total_reduction": 1 - r["bytes_total"] / base["bytes_total"],
            "fd_ratio_to_dense": (r["fd"] / base["fd"]) if r.get("fd") and base.get("fd") else None,
            "wall_s": r.get("wall_s"),
        }
    print(json.dumps({
        "bench": "fedphd_pruned_fmnist", "mode": "quick" if quick else "full", "sweep": str(folder),
        "scale": "FedPhD, 10 clients (2-class shards), 4 a round, 2 edges, central every 5, 30 rounds x 10 steps of "
                 "32, small U-Net 28 px, ratio 0.2; FD-domain on 500 DDPM-50 samples vs the 10k test split"
                 if not quick else "smoke: tiny U-Net at 16 px, 400 images, 5 rounds, batch 8",
        "results": results,
        "paper": {"cifar10": "ratio 0.2: 35.7M -> 20.3M parameters, 6.06 -> 3.42 GMACs; FID within a few points"},
        "wall_s": round(time.perf_counter() - t, 1),
        "ratio": results["init"]["fd_ratio_to_dense"],
    }))


if __name__ == "__main__":
    main()
