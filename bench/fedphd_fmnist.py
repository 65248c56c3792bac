"""FedPhD (Long et al. 2025) and its baselines on Fashion-MNIST, pathological non-IID, < 1 hour on 2 CPU cores.

Methods, all on the same partition, seed and number of client updates (4 of 10 clients a round):
FedAvg, FedProx (mu 0.01), SCAFFOLD (option II, plain SGD as published, and with Adam), HierFAVG
(2 edges, random edges, sample-weighted central aggregation every 5 rounds) and FedPhD (2 edges,
homogeneity-aware edge selection and central weights, a = 60000; no pruning). Runs through
``feddiff sweep`` variants (``--resume SWEEP_DIR`` continues an interrupted bench).

Scale (FedPhD's own: 20 clients, 10 000 rounds of 1 epoch on CIFAR-10 with a 35.7M U-Net on GPUs):
10 clients in FedPhD's 2-class shards (client 2i, 2i+1 hold classes i and i + 5), 30 rounds x 10 local
steps of 32, the `small` U-Net at 28 px; FD-domain on 500 DDPM-50 samples against the 10k test split,
after the last round (a central round: 30 is a multiple of 5). Prints one JSON object on its last line:
per method FD-domain, bytes per tier, and the reduction of central-link bytes (FedAvg: client-server;
hierarchies: edge-cloud) and of total bytes against FedAvg; ``ratio`` is FedPhD's FD over FedAvg's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _sweep_bench import run_bench_sweep, variant_rows


CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fedphd_fmnist.toml"

VARIANTS = {
    "fedavg": ['algorithm={name="fedavg", fraction=0.4}'],
    "fedprox": ['algorithm={name="fedprox", fraction=0.4, mu=0.01}'],
    "scaffold-sgd": ['algorithm={name="scaffold", fraction=0.4}', 'train.optimizer="sgd"', "train.lr=0.05"],
    "scaffold-adam": ['algorithm={name="scaffold", fraction=0.4}'],
    "hierfavg": ['algorithm={name="hierfavg", fraction=0.4, num_edges=2, central_every=5}'],
    "fedphd": [],
}


def overrides(quick: bool, variants: dict[str, list[str]] = VARIANTS) -> list[str]:
    """The protocol's overrides (full, or the smoke run) with ``variants`` as the sweep's points."""
    table = "{" + ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in variants.items()) + "}"
    common = [f"sweep.variants={table}", "partition.num_clients=10", 'model.preset="small"', "train.lr=2e-3",
              'train.lr_schedule="cosine"', "train.local_steps=10", "train.batch_size=32", "train.warmup_steps=20",
              "eval.every_rounds=0", "eval.num_inference_steps=50", "eval.grid_size=16", 'run.progress="lines"',
              "algorithm.central_a=60000.0"]
    if quick:
        return common + ["data.max_train_samples=400", 'model.preset="tiny"', "run.num_rounds=5", "train.local_steps=1",
                         "train.batch_size=8", "data.image_size=16", 'data.resize="resize"',
                         "eval.fid_num_samples=8", "eval.num_inference_steps=2", "eval.loss_num_samples=32",
                         "eval.reference_num_samples=200", "eval.grid_size=1", "algorithm.central_a=1000.0"]
    return common + ["run.num_rounds=30", "eval.fid_num_samples=500"]


def tiers(bytes_cumulative: dict) -> dict:
    return {link: d["down"] + d["up"] for link, d in bytes_cumulative.items() if link != "eval"}


def main() -> None:
    t = time.perf_counter()
    folder, quick = run_bench_sweep(__doc__, CONFIG, overrides)
    rows = variant_rows(folder)
    base = rows["fedavg"]
    base_central = tiers(base["bytes"]).get("client-server", 0)
    results = {}
    for name, r in rows.items():
        per_tier = tiers(r["bytes"])
        central = per_tier.get("edge-cloud", per_tier.get("client-server", 0))
        results[name] = {
            "fd_domain": r.get("fd"), "heldout_loss": r.get("heldout_loss"), "bytes_per_tier": per_tier,
            "bytes_total": r["bytes_total"],
            "central_link_reduction": 1 - central / base_central if base_central else None,
            "total_reduction": 1 - r["bytes_total"] / base["bytes_total"],
            "fd_ratio_to_fedavg": (r["fd"] / base["fd"]) if r.get("fd") and base.get("fd") else None,
        }
    print(json.dumps({
        "bench": "fedphd_fmnist", "mode": "quick" if quick else "full", "sweep": str(folder),
        "scale": "10 clients (FedPhD 2-class shards), 4 a round, 30 rounds x 10 local steps of 32, small U-Net 28 px, "
                 "2 edges, central every 5; FD-domain on 500 DDPM-50 samples vs the 10k test split"
                 if not quick else "smoke: tiny U-Net at 16 px, 400 images, 5 rounds, batch 8",
        "results": results,
        "paper": {"communication_reduction": "up to 88%", "fid_improvement": ">= 34%"},
        "wall_s": round(time.perf_counter() - t, 1),
        "ratio": results["fedphd"]["fd_ratio_to_fedavg"],
    }))


if __name__ == "__main__":
    main()
