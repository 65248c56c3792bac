"""Federated EMA rules on Fashion-MNIST: FD-domain with and without each rule, at equal compute.

The FedDM-vanilla protocol of ``bench/feddm_fmnist.py`` (5 clients, Dirichlet(0.5), every client every
round, 30 rounds x 10 local Adam steps of 32, cosine lr, the `small` U-Net at 28 px, FD-domain on 500
DDPM-50 samples vs the 10k test split), with ``[ema]`` at decay 0.99 per optimizer step (a horizon of
about 100 steps, 10 rounds) and diffusers' warm-up. Variants:

- FedAvg: no EMA; ``server`` (the server's EMA of the global model over rounds); ``client`` (the
  server's EMA carried through every client's local steps and averaged: twice the bytes);
- HierFAVG (2 edges, central aggregation every 5 rounds): ``server`` (the cloud's EMA) and ``edge``
  (edge EMAs synchronized at central aggregations).

An EMA does not change training: every EMA run also evaluates its raw model (``ema.evaluate_raw``), so
"without" is measured on the same trajectory, and FedAvg's raw models must score exactly as the run
without EMA (the bench checks it). Prints one JSON object on its last line: per variant FD-domain of the
EMA and of the raw model, their ratio, and bytes; ``ratio`` is the median over the EMA variants of
FD(EMA) / FD(raw), with the min and max as the spread. Resumable (``--resume SWEEP_DIR``).

    python bench/ema_fmnist.py           # the protocol above (about 1 hour on 2 cores)
    python bench/ema_fmnist.py --quick   # smoke run: tiny U-Net, 400 images, 2 rounds (< 30 s)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from _sweep_bench import run_bench_sweep
from feddm_fmnist import protocol

from feddiff.report import summarize_run
from feddiff.report.rows import load_run, metric_of
from feddiff.sweep import sweep_runs

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "feddm_vanilla.toml"
EMA = ["ema.decay=0.99", "ema.warmup=true", "ema.evaluate_raw=true"]
HIER = ['algorithm.name="hierfavg"', "algorithm.num_edges=2", "algorithm.central_every=5"]
VARIANTS = {
    "fedavg-none": [],
    "fedavg-server": ['ema.rule="server"', *EMA],
    "fedavg-client": ['ema.rule="client"', *EMA],
    "hierfavg-server": [*HIER, 'ema.rule="server"', *EMA],
    "hierfavg-edge": [*HIER, 'ema.rule="edge"', *EMA],
}


def overrides(quick: bool) -> list[str]:
    return protocol(quick, VARIANTS)  # FedDM-vanilla's, with these variants


def raw_fd(path: Path) -> float | None:
    """FD-domain of the raw model an EMA run evaluated beside its EMA (its last evaluation)."""
    evals = load_run(path).evals
    side = evals[-1][1].get("side", {}) if evals else {}
    return metric_of(side.get("raw", {}), "fd")


def main() -> None:
    t = time.perf_counter()
    folder, quick = run_bench_sweep(__doc__, CONFIG, overrides)
    results, ratios = {}, []
    for name, _, path in sweep_runs(folder):
        variant = next(v for v in VARIANTS if name.endswith(v))
        row = summarize_run(path, name)
        ema, raw = row.get("fd"), raw_fd(path) if variant != "fedavg-none" else row.get("fd")
        ratio = ema / raw if ema and raw and variant != "fedavg-none" else None
        if ratio is not None:
            ratios.append(ratio)
        results[variant] = {"fd_domain_ema": ema if variant != "fedavg-none" else None, "fd_domain_raw": raw,
                            "fd_ratio_ema_to_raw": ratio, "heldout_loss": row.get("heldout_loss"),
                            "bytes_total": row["bytes_total"]}
    none = results["fedavg-none"]["fd_domain_raw"]
    same_training = [v for v in ("fedavg-server", "fedavg-client") if results[v]["fd_domain_raw"] != none]
    print(json.dumps({
        "bench": "ema_fmnist", "mode": "quick" if quick else "full", "sweep": str(folder),
        "scale": "smoke: tiny U-Net, 400 images, 2 rounds" if quick else
                 "5 clients, Dirichlet(0.5), 30 rounds x 10 local steps of 32, small U-Net 28 px; FD-domain on 500 "
                 "DDPM-50 samples vs the 10k test split; EMA decay 0.99 per step with warm-up",
        "results": results,
        "raw_equals_no_ema": not same_training,  # an EMA must not change the training
        "wall_s": round(time.perf_counter() - t, 1),
        "ratio": round(statistics.median(ratios), 4) if ratios else None,
        "ratio_min": round(min(ratios), 4) if ratios else None, "ratio_max": round(max(ratios), 4) if ratios else None,
        "ratio_means": "median over the EMA variants of FD-domain(EMA) / FD-domain(raw model of the same run)",
    }))


if __name__ == "__main__":
    main()
