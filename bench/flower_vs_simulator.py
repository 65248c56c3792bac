"""The same FedAvg run on the simulator and on Flower's deployment engine (real processes on loopback).

For each preset (``tiny``, ``fmnist``), one config (5 clients, 3 rounds x 20 local Adam steps of 32 on
Fashion-MNIST at 28 px) runs in the in-process simulator and on a local Flower deployment (SuperLink +
5 SuperNodes, ``flwr run``), alternately. Per round the server-side wall time comes from each run's
``metrics.jsonl`` (``time_s.round``); steady rounds are rounds 2.. (round 1 also pays for the nodes'
first dataset read). Flower runs twice: with a warm worker beside each SuperNode (the default of
``feddiff flower``: the ClientApp hands each message to a process that keeps torch, the partition and
the client between messages) and without (each message's ClientApp imports torch and rebuilds the
client). Reported: per-round times, the steady-round ratio Flower / simulator (and its range over the
steady rounds), the fixed per-round cost (their difference) and the whole wall time with start-up. Flower's Ray simulation is
not installed here (``flwr[simulation]``), so it is not measured. The weights of the two runs are
compared too (equal to float tolerance).

Prints one JSON object on its last line; ``ratio`` is the steady-round ratio of ``fmnist`` (target <= 1.5).

    python bench/flower_vs_simulator.py           # tiny and fmnist, 5 clients, 3 rounds (~10 min)
    python bench/flower_vs_simulator.py --quick   # tiny at 16 px, 2 clients, 2 rounds
    python bench/flower_vs_simulator.py --anchor  # the anchor workload: 4 clients, `small` at 32 px
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from feddiff.config import config_from_dict
from feddiff.engines.flower.local import run_local
from feddiff.engines.runner import run
from feddiff.runs import RunDir


def make_cfg(preset: str, quick: bool, out: str):
    k, r, s = (2, 2, 5) if quick else (5, 3, 20)
    size = 16 if quick else 28
    if preset == "anchor":  # shared/reference/anchor_flower.md: 4 clients x 20 steps, the `small` U-Net at 32 px
        preset, k, size = "small", 4, 32
    return config_from_dict({
        "run": {"name": f"flower-bench-{preset}", "num_rounds": r, "progress": "none", "out_dir": out,
                "checkpoint_every": 0},
        "data": {"image_size": size, "resize": "resize" if quick else "pad",
                 "max_train_samples": 1000 if quick else 10000},
        "partition": {"method": "iid", "num_clients": k},
        "model": {"preset": preset},
        "train": {"lr": 1e-3, "batch_size": 32, "local_steps": s},
        "eval": {"grid_size": 0, "loss_num_samples": 0},
    })


def rounds(rd: RunDir) -> list[float]:
    return [r["time_s"]["round"] for r in rd.read_metrics()]


def weights(rd: RunDir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in rd.latest_checkpoint()[1].items() if k.startswith("strategy/global/")}


def bench(preset: str, quick: bool, out: Path) -> dict:
    cfg = make_cfg(preset, quick, str(out))
    t = time.perf_counter()
    sim = run(cfg)
    sim_wall = time.perf_counter() - t
    rs = rounds(sim)
    steady_s = statistics.mean(rs[1:])
    row = {"preset": preset if preset != "anchor" else "anchor (small, 32 px)", "clients": cfg.partition.num_clients,
           "rounds": cfg.run.num_rounds, "local_steps": cfg.train.local_steps,
           "simulator_round_s": [round(x, 2) for x in rs], "simulator_wall_s": round(sim_wall, 1)}
    # with a warm worker beside each SuperNode (the default), and without (a torch import and a client per message)
    for label, workers in (("flower", True), ("flower_no_workers", False)):
        t = time.perf_counter()
        flower = RunDir.open(run_local(cfg, out / f"{label}-{preset}", timeout_s=1800, workers=workers))
        wall = time.perf_counter() - t
        rf = rounds(flower)
        steady_f = statistics.mean(rf[1:])
        a, b = weights(sim), weights(flower)
        row[label] = {"round_s": [round(x, 2) for x in rf], "steady_ratio": round(steady_f / steady_s, 3),
                      "steady_ratio_range": [round(min(rf[1:]) / max(rs[1:]), 3), round(max(rf[1:]) / min(rs[1:]), 3)],
                      "fixed_per_round_s": round(steady_f - steady_s, 2), "wall_s": round(wall, 1),
                      "max_weight_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
                      "bytes_equal": [r["bytes"] for r in sim.read_metrics()] == [r["bytes"] for r in flower.read_metrics()]}
        print(json.dumps({label: row[label]}), flush=True)
    row["steady_ratio"] = row["flower"]["steady_ratio"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny at 16 px, 2 clients, 2 rounds")
    ap.add_argument("--anchor", action="store_true", help="only the reference workload of anchor_flower.md: "
                                                          "4 clients x 20 steps, `small` U-Net at 32 px")
    args = ap.parse_args()
    t = time.perf_counter()
    presets = ["tiny"] if args.quick else ["anchor"] if args.anchor else ["tiny", "fmnist"]
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        rows = [bench(p, args.quick, Path(tmp)) for p in presets]
    head = rows[-1]
    print(json.dumps({"bench": "flower_vs_simulator", "quick": args.quick, "flower": "1.42.0 deployment engine",
                      "ray_simulation": "not installed (flwr[simulation])", "rows": rows,
                      "ratio": head["steady_ratio"], "target": 1.5, "wall_s": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
