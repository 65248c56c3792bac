"""Client-level DP (DP-FedAvg) on Fashion-MNIST: FD-domain against epsilon for a few noise levels.

The FedDM-vanilla protocol of ``bench/feddm_fmnist.py`` (5 clients, Dirichlet(0.5), every client every
round, 30 rounds x 10 local Adam steps of 32, the `small` U-Net at 28 px, FD-domain on 500 DDPM-50
samples vs the 10k test split), with updates clipped to norm C and Gaussian noise of multiplier sigma
(``[dp]``); the reference is the same run without DP, in the same sweep. Epsilon at delta = 1e-5 comes
from Opacus' RDP accountant (sampling rate 1: no amplification is claimed; five
clients make the noise on the mean large: 2 sigma C / 5). Variants: no DP, clipping only
(``robust.clip_norm``, no noise, no guarantee), and sigma in {0.3, 1.0, 3.0} at C = 1.

Prints one JSON object on its last line: per variant FD-domain, held-out loss, epsilon and the FD
ratio to no DP; ``ratio`` is the FD ratio at sigma = 1.0. Resumable (``--resume SWEEP_DIR``).

    python bench/dp_fmnist.py           # the protocol above (about 1 hour on 2 cores)
    python bench/dp_fmnist.py --quick   # smoke run: tiny U-Net, 400 images, 2 rounds (< 30 s)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _sweep_bench import run_bench_sweep, variant_rows
from feddm_fmnist import protocol

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "feddm_vanilla.toml"
CLIP = 1.0
VARIANTS = {
    "no-dp": [],
    "clip-only": [f"robust.clip_norm={CLIP}"],
    "sigma-0.3": [f"dp.clip_norm={CLIP}", "dp.noise_multiplier=0.3"],
    "sigma-1.0": [f"dp.clip_norm={CLIP}", "dp.noise_multiplier=1.0"],
    "sigma-3.0": [f"dp.clip_norm={CLIP}", "dp.noise_multiplier=3.0"],
}


def overrides(quick: bool) -> list[str]:
    return protocol(quick, VARIANTS)  # FedDM-vanilla's, with these variants


def main() -> None:
    t = time.perf_counter()
    folder, quick = run_bench_sweep(__doc__, CONFIG, overrides)
    rows = variant_rows(folder)
    base = rows["no-dp"]
    results = {}
    for name, r in rows.items():
        results[name] = {
            "fd_domain": r.get("fd"), "heldout_loss": r.get("heldout_loss"), "epsilon": r.get("epsilon"),
            "delta": r.get("delta"),
            "fd_ratio_to_no_dp": (r["fd"] / base["fd"]) if r.get("fd") and base.get("fd") else None,
        }
    print(json.dumps({
        "bench": "dp_fmnist", "mode": "quick" if quick else "full", "sweep": str(folder),
        "scale": "smoke: tiny U-Net, 400 images, 2 rounds" if quick else
                 "5 clients, Dirichlet(0.5), 30 rounds x 10 local steps of 32, small U-Net 28 px; FD-domain on 500 "
                 "DDPM-50 samples vs the 10k test split",
        "clip_norm": CLIP, "results": results, "wall_s": round(time.perf_counter() - t, 1),
        "ratio": results["sigma-1.0"]["fd_ratio_to_no_dp"], "ratio_means": "FD-domain at sigma 1.0 / without DP",
    }))


if __name__ == "__main__":
    main()
