"""Simulator overhead: K clients x S local steps in the simulator vs a plain PyTorch loop.

Both do the same K*S*R Adam steps on the same model, batch size and data in this process; the
simulator adds what FL needs (serializing every message, the ledger, aggregation, metrics,
checkpoints). The reference is measured in the same run, alternating, and the medians compared.
Prints one JSON object on its last line with ``ratio`` = simulator / plain (target <= 1.05).

    python bench/simulator_overhead.py           # small U-Net, 28 px, K=5, S=20, R=3
    python bench/simulator_overhead.py --quick   # tiny U-Net, 16 px, K=2, S=10, R=2 (< 30 s)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import torch

from feddiff.config import config_from_dict
from feddiff.data.transforms import to_model_range
from feddiff.engines.simulator import Simulator
from feddiff.engines.experiment import build_experiment
from feddiff.model.diffusion import denoising_loss
from feddiff.runs import RunDir


def make_cfg(quick: bool, out: str):
    k, s, r = (2, 10, 2) if quick else (5, 20, 3)
    return config_from_dict({
        "run": {"name": "bench", "num_rounds": r, "progress": "none", "checkpoint_every": 0, "out_dir": out},
        "data": {"image_size": 16 if quick else 28, "resize": "resize" if quick else "pad",
                 "max_train_samples": 2000 if quick else 10000},
        "partition": {"method": "iid", "num_clients": k},
        "model": {"preset": "tiny" if quick else "small"},
        "train": {"lr": 1e-3, "batch_size": 32, "local_steps": s},
        "eval": {"grid_size": 0, "loss_num_samples": 0},
    })


def plain_loop(exp, steps: int) -> float:
    """The reference: one model, one Adam, ``steps`` steps over the same client data in turn."""
    model, sched = exp.model, exp.scheduler
    opt = torch.optim.Adam(model.parameters(), lr=exp.cfg.train.lr)
    g = torch.Generator().manual_seed(0)
    per_client = steps // exp.num_clients
    t = time.perf_counter()
    for images in exp.client_images:
        for _ in range(per_client):
            idx = torch.randint(0, images.shape[0], (exp.cfg.train.batch_size,), generator=g)
            loss = denoising_loss(model, to_model_range(images[idx]), sched, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), exp.cfg.train.grad_clip)
            opt.step()
    return time.perf_counter() - t


def simulator(exp, out: str) -> float:
    sim = Simulator(exp, RunDir.create(out, "bench"))
    sim.initialize()
    t = time.perf_counter()
    sim.run()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run under 30 s")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved (plain, simulator) pairs (default 5, quick 3)")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="feddiff-bench-")
    try:
        cfg = make_cfg(args.quick, out)
        exp = build_experiment(cfg)
        steps = cfg.partition.num_clients * cfg.train.local_steps * cfg.run.num_rounds
        plain_loop(exp, cfg.partition.num_clients * 2)  # warm-up: allocator, kernels
        plain_s, sim_s = [], []
        for _ in range(args.repeats or (3 if args.quick else 5)):  # interleaved pairs: drift hits both
            plain_s.append(plain_loop(exp, steps))
            sim_s.append(simulator(build_experiment(cfg), out))
            print(f"plain {plain_s[-1]:.2f}s  simulator {sim_s[-1]:.2f}s", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    p, s = statistics.median(plain_s), statistics.median(sim_s)
    ratios = sorted(b / a for a, b in zip(plain_s, sim_s))  # one ratio per pair, measured side by side
    print(json.dumps({
        "bench": "simulator_overhead", "mode": "quick" if args.quick else "full", "model": cfg.model.preset,
        "image_size": cfg.data.image_size, "clients": cfg.partition.num_clients, "local_steps": cfg.train.local_steps,
        "rounds": cfg.run.num_rounds, "optimizer_steps": steps, "threads": torch.get_num_threads(),
        "plain_s": round(p, 3), "simulator_s": round(s, 3), "ratio": round(statistics.median(ratios), 4),
        "ratio_min": round(ratios[0], 4), "ratio_max": round(ratios[-1], 4), "pairs": len(ratios), "target_ratio": 1.05,
    }))


if __name__ == "__main__":
    main()
