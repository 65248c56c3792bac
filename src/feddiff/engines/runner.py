"""Run, resume and evaluate a run folder: the library calls behind ``feddiff run`` and ``feddiff eval``.

Engine-agnostic entry points; today they drive the in-process simulator (``engines/simulator.py``), the
default engine. The round loop itself is ``engines/loop.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from feddiff.config import Config, apply_overrides, config_from_dict, load_resolved
from feddiff.engines.evaluate import load_feature_network
from feddiff.engines.experiment import DeclaredData, build_experiment
from feddiff.engines.simulator import Simulator
from feddiff.runs import RunDir, RunError

__all__ = ["RESUMABLE_OVERRIDES", "evaluate_checkpoint", "resume", "run"]


def evaluate_checkpoint(path: str | Path, rnd: int | None, overrides: list[str]) -> dict[str, Any]:
    """Evaluate a run's checkpoint with eval.* overrides; appends the result to ``evals.jsonl``."""
    run_dir = RunDir.open(path)
    raw = apply_overrides(load_resolved(run_dir.config_path).model_dump(mode="json"), list(overrides),
                          allowed=("eval.",), where="in feddiff eval (it changes eval.* settings only)")
    cfg = config_from_dict(raw, f"{run_dir.config_path} with {' '.join(overrides)}")
    declared = declared_data(run_dir)
    if declared is not None and cfg.eval.federated_reference and cfg.eval.fid_num_samples:
        raise RunError(f"{run_dir.path} was trained by nodes on their own data: federated reference statistics "
                       "need those nodes (the clients' images are not here)")
    sim = Simulator(build_experiment(cfg, declared), run_dir)  # (own data: no training image read)
    t = time.perf_counter()
    done = sim.restore(rnd)
    result = sim.evaluate(done)
    record = {"round": done, "eval": result, "eval_s": time.perf_counter() - t,
              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": list(overrides)}
    with open(run_dir.path / "evals.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record

def restored(path: str | Path, overrides: list[str], section: str, command: str):
    """A run folder's newest checkpoint in a simulator, for a command that changes only ``section.*`` and
    ``eval.*`` settings (``feddiff personalize``, ``feddiff audit``); returns (simulator, rounds done).

    A Flower run with personal models is refused: those models are on the nodes.
    """
    from feddiff.algorithms import get_algorithm

    run_dir = RunDir.open(path)
    cfg = load_resolved(run_dir.config_path)
    raw = apply_overrides(cfg.model_dump(mode="json"), list(overrides), allowed=(f"{section}.", "eval."),
                          where=f"in {command} (it changes {section}.* and eval.* settings only)")
    cfg = config_from_dict(raw, f"{run_dir.config_path} with {' '.join(overrides)}")
    engine = run_dir.engine()
    if engine != "simulator" and get_algorithm(cfg.algorithm.name).strategy.personalized:
        raise RunError(f"{run_dir.path} was trained on {engine}: its personal models are on the nodes, where each "
                       f"site can run {command} on its own")
    if declared_data(run_dir) is not None:
        raise RunError(f"{run_dir.path} was trained by nodes on their own data, which is on the nodes: {command} "
                       "needs the clients' images in this process")
    sim = Simulator(build_experiment(cfg), run_dir)
    return sim, sim.restore()


def declared_data(run_dir: RunDir) -> DeclaredData | None:
    """The data its nodes declared, for a run trained by Flower nodes on their own data; None otherwise."""
    path = run_dir.path / "partition.json"
    return DeclaredData.of_run(json.loads(path.read_text())) if path.exists() else None


def run(cfg: Config, out_dir: str | None = None, run_path: str | Path | None = None) -> RunDir:
    """Train a new run from ``cfg``; returns its folder (``run_path``: exactly there, else a new
    uniquely named folder under ``out_dir``)."""
    exp = build_experiment(cfg)  # fails on bad data before any folder is made
    if cfg.eval.fid_num_samples:  # ... and on a missing feature network (the domain one is trained here)
        load_feature_network(cfg, exp.device, log=lambda m: print(m, flush=True))
    if run_path is not None:
        run_dir = RunDir.create_at(run_path)
    else:
        run_dir = RunDir.create(out_dir or cfg.run.out_dir, f"{cfg.run.name or 'run'}")
    sim = Simulator(exp, run_dir)
    sim.initialize()
    return sim.run()

# settings a resume may change: they do not touch the training math
RESUMABLE_OVERRIDES = ("run.num_rounds", "run.progress", "run.checkpoint_every", "run.keep_checkpoints",
                       "run.tensorboard", "eval.", "personalize.", "audit.")

def resume(path: str | Path, overrides: list[str] = ()) -> RunDir:
    """Continue a run from its last checkpoint (optionally with more rounds: run.num_rounds=N)."""
    run_dir = RunDir.open(path)
    engine = run_dir.engine()
    if engine != "simulator":  # its clients' records are on the nodes: the simulator would start them empty
        raise RunError(f"{run_dir.path} was trained on {engine}; `feddiff run --resume` continues simulator runs "
                       "only (its clients' records are on the nodes)")
    cfg = load_resolved(run_dir.config_path)
    notes: list[str] = []
    if overrides:
        raw = apply_overrides(cfg.model_dump(mode="json"), list(overrides), allowed=RESUMABLE_OVERRIDES,
                              where="on resume (it would change the training math)")
        t = cfg.train
        if raw["run"]["num_rounds"] != cfg.run.num_rounds and t.lr_schedule == "cosine" and not t.lr_schedule_rounds:
            # the schedule keeps the length it was trained with; added rounds train at lr * min_lr_ratio
            raw["train"]["lr_schedule_rounds"] = cfg.run.num_rounds
            notes.append(f"note: the cosine lr schedule keeps its {cfg.run.num_rounds} rounds "
                         f"(train.lr_schedule_rounds); rounds after it train at lr x {t.min_lr_ratio}")
        cfg = config_from_dict(raw, f"{run_dir.config_path} with overrides")
    sim = Simulator(build_experiment(cfg), run_dir)
    sim.resume()
    if sim.start_round >= cfg.run.num_rounds:
        if sim.end_phases(only_missing=True):  # killed during the phases that end the run: only they are redone
            if overrides:
                run_dir.write_json("config.json", cfg.model_dump(mode="json"))
            return run_dir
        raise RunError(
            f"{run_dir.path} already finished all {cfg.run.num_rounds} rounds; "
            "extend it with --set run.num_rounds=N (fine-tune or audit it with `feddiff personalize` or "
            "`feddiff audit`)"
        )
    if overrides:  # only once the resume is known to go ahead
        run_dir.write_json("config.json", cfg.model_dump(mode="json"))
        for note in notes:
            print(note, flush=True)
    return sim.run()
