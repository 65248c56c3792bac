"""Fault soak: many rounds with 30% of client messages failing at random, on the simulator.

Three runs of the same federation (tiny U-Net, Fashion-MNIST at 16 px), interleaved per repeat:

- ``clean``: no faults (the reference, for the wall-time ratio and the expected weights);
- ``recoverable``: 30% of messages lost before training (``raise`` / ``disconnect``, first attempt
  only), ``faults.policy = "reject"`` with retries: every round must recover, and the final weights
  must equal ``clean``'s exactly (a retried client trains as it would have);
- ``hostile``: 30% of messages fail in every way ``engines/faults.py`` knows (NaN, wrong shapes and
  names, truncated, oversized, poisoned 1000x updates, lost), ``min_replies = 2`` with one retry and
  ``[robust] outlier_factor = 5``: rounds complete or are skipped by policy, every bad reply is refused
  with its reason, the weights stay finite, and a second run with the same seeds ends with the same
  weights (deterministic).

Prints rounds completed and skipped, replies refused by reason, whether the weights match, and
``ratio`` = hostile wall time / clean wall time (median over repeats, with the spread). The last line
is one JSON object.

    python bench/fault_soak.py           # 8 clients, 40 rounds, 2 repeats
    python bench/fault_soak.py --quick   # 4 clients, 6 rounds, 1 repeat (< 30 s)
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from feddiff.config import config_from_dict
from feddiff.engines.experiment import build_experiment
from feddiff.engines.faults import KINDS, FaultyEngine, random_plan
from feddiff.engines.simulator import Simulator, SimulatorEngine
from feddiff.runs import RunDir


def make_cfg(clients: int, rounds: int, out: str, **sections) -> object:
    raw = {
        "run": {"name": "soak", "num_rounds": rounds, "progress": "none", "checkpoint_every": 0, "out_dir": out,
                "num_threads": 1},
        "data": {"image_size": 16, "resize": "resize", "max_train_samples": 100 * clients},
        "partition": {"method": "iid", "num_clients": clients},
        "model": {"preset": "tiny"},
        "train": {"lr": 1e-3, "batch_size": 16, "local_steps": 3},
        "eval": {"grid_size": 0, "loss_num_samples": 0},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


def run(cfg, plan, folder: Path) -> tuple[float, RunDir, FaultyEngine]:
    exp = build_experiment(cfg)
    engine = FaultyEngine(SimulatorEngine(exp), plan)
    sim = Simulator(exp, RunDir.create_at(folder), engine=engine)
    sim.initialize()
    t = time.perf_counter()
    sim.run()
    return time.perf_counter() - t, sim.run_dir, engine


def weights(rd: RunDir) -> dict[str, torch.Tensor]:
    _, tensors, _ = rd.latest_checkpoint()
    return {k: v for k, v in tensors.items() if k.startswith("strategy/")}


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


REASONS = [  # (pattern in the refusal's text, its kind), first match wins
    (r"NaN|non-finite|not finite|Inf", "non-finite values"), (r"checksum", "corrupted frame (checksum)"),
    (r"exceeds this task's limit", "oversized reply"), (r"shape", "wrong shape"),
    (r"unexpected|missing|lacks|unknown tensor|renamed", "wrong tensor names"), (r"update norm", "outlier update norm"),
    (r"raised", "client raised"), (r"disconnected|no reply", "no reply"), (r"discarded", "discarded by round policy"),
]


def reason_kind(reason: str) -> str:
    """A refusal's kind, from its text."""
    for pattern, kind in REASONS:
        if re.search(pattern, reason):
            return kind
    return re.sub(r"\d+(\.\d+)?", "N", reason)[:80]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 clients, 6 rounds, 1 repeat (< 30 s)")
    ap.add_argument("--rate", type=float, default=0.3, help="share of client messages that fail (default 0.3)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clients, rounds, repeats = (4, 6, 1) if args.quick else (8, 40, 2)
    tmp = Path(tempfile.mkdtemp(prefix="feddiff-soak-"))
    recover = {"faults": {"policy": "reject", "retries": 6}}
    hostile = {"faults": {"min_replies": 2, "retries": 1}, "robust": {"outlier_factor": 5.0}}
    lost = random_plan(args.rate, kinds=("raise", "disconnect"), seed=1, first_attempt_only=True)
    anything = random_plan(args.rate, kinds=KINDS, seed=2)
    times: dict[str, list[float]] = collections.defaultdict(list)
    results: dict[str, object] = {}
    for rep in range(repeats):
        dt, clean, _ = run(make_cfg(clients, rounds, str(tmp)), lambda r, c, a: None, tmp / f"clean{rep}")
        times["clean"].append(dt)
        dt, rec, eng_rec = run(make_cfg(clients, rounds, str(tmp), **recover), lost, tmp / f"recoverable{rep}")
        times["recoverable"].append(dt)
        dt, hos, eng_hos = run(make_cfg(clients, rounds, str(tmp), **hostile), anything, tmp / f"hostile{rep}")
        times["hostile"].append(dt)
        print(f"repeat {rep + 1}/{repeats}: clean {times['clean'][-1]:.1f} s, recoverable {times['recoverable'][-1]:.1f} s, "
              f"hostile {times['hostile'][-1]:.1f} s", flush=True)
        if rep == 0:
            m_rec, m_hos = rec.read_metrics(), hos.read_metrics()
            refused = collections.Counter(reason_kind(x["reason"]) for r in m_hos for x in r.get("rejected", []))
            injected = collections.Counter(kind for *_, kind in eng_hos.injected)
            w_hos = weights(hos)
            # nothing bad reached the model: no client whose last message of a round was faulty is among
            # that round's aggregated replies
            last = {key: n - 1 for key, n in eng_hos.attempts.items()}
            bad_last = {(r, c) for r, c, a, _ in eng_hos.injected if last[(r, c)] == a}
            leaked = sorted((rec["round"], row["id"]) for rec in m_hos for row in rec["clients"]
                            if (rec["round"] - 1, row["id"]) in bad_last)
            results = {
                "recoverable": {
                    "rounds_completed": sum("skipped" not in r for r in m_rec), "rounds": rounds,
                    "faults_injected": len(eng_rec.injected),
                    "retries": sum(len(r.get("round_policy", {}).get("attempts", [])) for r in m_rec),
                    "weights_equal_clean_run": equal(weights(rec), weights(clean)),
                },
                "hostile": {
                    "rounds_completed": sum("skipped" not in r for r in m_hos),
                    "rounds_skipped": sum("skipped" in r for r in m_hos), "rounds": rounds,
                    "faults_injected": dict(sorted(injected.items())),
                    "replies_refused_by_reason": dict(refused.most_common()),
                    "weights_finite": all(bool(torch.isfinite(v).all()) for v in w_hos.values()
                                          if v.is_floating_point()),
                    "faulty_replies_aggregated": len(leaked),
                },
            }
            _, again, _ = run(make_cfg(clients, rounds, str(tmp), **hostile), anything, tmp / "hostile-again")
            results["hostile"]["weights_equal_on_rerun"] = equal(weights(again), w_hos)
    ratios = [h / c for h, c in zip(times["hostile"], times["clean"])]
    for name, res in results.items():
        print(f"{name}: " + json.dumps(res), flush=True)
    ok = (results["recoverable"]["weights_equal_clean_run"] and results["hostile"]["weights_finite"]
          and results["hostile"]["faulty_replies_aggregated"] == 0
          and results["hostile"]["weights_equal_on_rerun"]
          and results["recoverable"]["rounds_completed"] == rounds)
    print(json.dumps({
        "bench": "fault_soak", "mode": "quick" if args.quick else "full", "clients": clients, "rounds": rounds,
        "failure_rate": args.rate, "ok": ok, "ratio": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
        "ratio_means": "hostile wall time / clean wall time", **results,
    }))


if __name__ == "__main__":
    main()
