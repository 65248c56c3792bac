"""Aggregation throughput: the server's weighted mean of K client models against a copy of them.

``weighted_mean`` (``algorithms/aggregate.py``) is what FedAvg, FedProx, SCAFFOLD, HierFAVG's edges
and FedPhD call on every round. It reads K models and writes one. The reference, timed in the
same run and interleaved with it pair by pair, is a plain ``clone`` of the same K models (the same
bytes read, K times the bytes written): ``ratio`` = copy seconds / aggregation seconds, so 1.0
means averaging costs what copying the replies costs, and the issue's target is at least 0.5.
Reported: the median ratio over the pairs and its spread (min, max), MB/s of both, and the largest
difference between the mean and a float64 reference (the result is checked, not only timed).

Torch runs on one thread by default, as in ``codec_throughput.py`` (``--threads``).

    python bench/aggregation_throughput.py           # small (K=5, 20) and cifar10-ddpm (K=5, 10)
    python bench/aggregation_throughput.py --quick   # small, K=5 (< 30 s)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from feddiff.algorithms.aggregate import weighted_mean
from feddiff.model.presets import build_unet, unet_kwargs

MODELS = {"small": ("small", 1, 28), "cifar10-ddpm": ("cifar10-ddpm", 3, 32)}


def client_models(model: str, k: int) -> list[dict[str, torch.Tensor]]:
    preset, channels, size = MODELS[model]
    base = build_unet(unet_kwargs(preset, channels, size), 0).state_dict()
    g = torch.Generator().manual_seed(1)
    return [{n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]


def copy_all(states: list[dict[str, torch.Tensor]]) -> float:
    t = time.perf_counter()
    out = [{n: v.clone() for n, v in s.items()} for s in states]
    dt = time.perf_counter() - t
    del out
    return dt


def mean_all(states: list[dict[str, torch.Tensor]], weights: list[float]) -> float:
    t = time.perf_counter()
    out = weighted_mean(states, weights)
    dt = time.perf_counter() - t
    del out
    return dt


def bench(model: str, k: int, pairs: int) -> dict:
    states = client_models(model, k)
    weights = [float(600 + 37 * i) for i in range(k)]  # unequal partition sizes, as under quantity skew
    mb = sum(v.numel() * v.element_size() for s in states for v in s.values()) / 1e6
    # correctness first: against a float64 mean
    out = weighted_mean(states, weights)
    total = sum(weights)
    err = max((sum(s[n].double() * (w / total) for s, w in zip(states, weights)) - out[n].double()).abs().max().item()
              for n in out)
    copy_all(states), mean_all(states, weights)  # warm-up
    copies, means, ratios = [], [], []
    for _ in range(pairs):
        c, m = copy_all(states), mean_all(states, weights)
        copies.append(c), means.append(m), ratios.append(c / m)
    res = {
        "model": model, "clients": k, "tensors": len(states[0]), "input_mb": round(mb, 2),
        "copy_mb_s": round(mb / statistics.median(copies), 1), "mean_mb_s": round(mb / statistics.median(means), 1),
        "ratio": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4), "pairs": pairs, "max_abs_error_vs_float64": float(f"{err:.3g}"),
    }
    print(f"  {model} K={k}: {mb:.1f} MB in, copy {res['copy_mb_s']:.0f} MB/s, weighted mean {res['mean_mb_s']:.0f} MB/s"
          f", ratio {res['ratio']:.3f} ({res['ratio_min']:.3f}-{res['ratio_max']:.3f}), error {err:.2g}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, K=5 only (< 30 s)")
    ap.add_argument("--pairs", type=int, default=None, help="interleaved copy/mean pairs (default 9, quick 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("small", 5)] if args.quick else [("small", 5), ("small", 20), ("cifar10-ddpm", 5), ("cifar10-ddpm", 10)]
    pairs = args.pairs or (7 if args.quick else 9)
    results = [bench(model, k, pairs) for model, k in cases]
    head = results[-1]
    print(json.dumps({
        "bench": "aggregation_throughput", "mode": "quick" if args.quick else "full", "threads": torch.get_num_threads(),
        "headline": f"weighted mean of {head['clients']} {head['model']} models vs copying them",
        "ratio": head["ratio"], "ratio_min": head["ratio_min"], "ratio_max": head["ratio_max"], "target": 0.5,
        "cases": results,
    }))


if __name__ == "__main__":
    main()
