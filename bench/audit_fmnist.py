"""Leakage audit with and without client-level DP on Fashion-MNIST: what the privacy budget buys, measured.

Small silos memorize: 5 clients with 100 Fashion-MNIST images each (``data.max_train_samples=500``,
Dirichlet(0.5)), the `small` U-Net at 28 px, FedAvg for 40 rounds x 10 local Adam steps of 32 (about
130 passes over each client's images), then ``feddiff audit`` on the final model: 256 DDIM-50 samples
against each client's images (nearest distances, Carlini et al.'s near-copies) and loss-threshold
membership inference on each client's 100 images against 100 label-matched test images. Variants: no DP,
clipping only (``robust.clip_norm = 1``), and DP-FedAvg at C = 1 with sigma 0.3 and 1.0 (epsilon from
Opacus at delta 1e-5, sampling rate 1).

Prints one JSON object on its last line: per variant epsilon, membership AUC (mean and max over clients),
TPR at 1% FPR, near-copy share, nearest pixel distance and FD-domain; ``ratio`` is the mean membership
AUC with DP at sigma 1.0 over the one without DP, with the min and max over the DP variants as the
spread. Resumable (``--resume SWEEP_DIR``).

    python bench/audit_fmnist.py           # the protocol above (about 25 minutes on 2 cores)
    python bench/audit_fmnist.py --quick   # smoke run: tiny U-Net, 400 images, 2 rounds (< 30 s)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _sweep_bench import run_bench_sweep, variant_rows
from feddm_fmnist import toml_value

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "feddm_vanilla.toml"
VARIANTS = {
    "no-dp": [],
    "clip-only": ["robust.clip_norm=1.0"],
    "sigma-0.3": ["dp.clip_norm=1.0", "dp.noise_multiplier=0.3"],
    "sigma-1.0": ["dp.clip_norm=1.0", "dp.noise_multiplier=1.0"],
}


def overrides(quick: bool) -> list[str]:
    variants = "{" + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in VARIANTS.items()) + "}"
    common = [f"sweep.variants={variants}", "partition.num_clients=5", 'model.preset="small"', "train.lr=2e-3",
              'train.lr_schedule="cosine"', "train.local_steps=10", "train.warmup_steps=20", "eval.every_rounds=0",
              'run.progress="lines"', "audit.enabled=true", "eval.grid_size=16"]
    if quick:
        return common + ["data.max_train_samples=400", 'model.preset="tiny"', "run.num_rounds=2", "train.local_steps=1",
                         "eval.fid_num_samples=8", "eval.num_inference_steps=2", "eval.loss_num_samples=32",
                         "eval.reference_num_samples=200", "eval.grid_size=1", "audit.num_samples=8",
                         "audit.mia_num_images=16"]
    return common + ["data.max_train_samples=500", "run.num_rounds=40", "eval.fid_num_samples=500",
                     "eval.num_inference_steps=50", "audit.num_samples=256", "audit.mia_num_images=100"]


def main() -> None:
    t = time.perf_counter()
    folder, quick = run_bench_sweep(__doc__, CONFIG, overrides)
    rows = variant_rows(folder)
    results = {}
    for name, r in rows.items():
        a = r.get("audit", {})
        results[name] = {"epsilon": r.get("epsilon"), "mia_auc_mean": a.get("mia_auc_mean"),
                         "mia_auc_max": a.get("mia_auc_max"), "tpr_at_1pct_fpr_max": a.get("mia_tpr_at_1pct_fpr_max"),
                         "near_copy_share_mean": a.get("near_copy_fraction_mean"),
                         "nearest_pixel_distance": a.get("nn_pixel_min_min"), "flagged": a.get("flagged"),
                         "fd_domain": r.get("fd")}
    base = results["no-dp"]["mia_auc_mean"]
    ratios = [results[v]["mia_auc_mean"] / base for v in ("sigma-0.3", "sigma-1.0")
              if base and results[v]["mia_auc_mean"] is not None]
    print(json.dumps({
        "bench": "audit_fmnist", "mode": "quick" if quick else "full", "sweep": str(folder),
        "scale": "smoke: tiny U-Net, 400 images, 2 rounds" if quick else
                 "5 clients x 100 images, Dirichlet(0.5), 40 rounds x 10 local steps of 32, small U-Net 28 px; audit: "
                 "256 DDIM-50 samples, 100 members vs 100 label-matched held-out images per client",
        "results": results, "wall_s": round(time.perf_counter() - t, 1),
        "ratio": round(results["sigma-1.0"]["mia_auc_mean"] / base, 4) if ratios and results["sigma-1.0"][
            "mia_auc_mean"] else None,
        "ratio_min": round(min(ratios), 4) if ratios else None, "ratio_max": round(max(ratios), 4) if ratios else None,
        "ratio_means": "mean membership AUC with DP (sigma 1.0) / without DP; min and max over sigma 0.3 and 1.0",
    }))


if __name__ == "__main__":
    main()
