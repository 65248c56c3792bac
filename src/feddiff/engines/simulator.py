"""The embedded in-process simulator: the default engine, and the round loop written once.

Clients run one after another on one working model. Every task and reply is serialized to real
bytes (``LocalTransport``), so the ledger counts what a distributed engine would send. All
randomness derives from (seed, round, client), so a run killed at any moment and resumed from its
last checkpoint ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMPipeline

import feddiff
from feddiff.algorithms.base import Reply
from feddiff.client.runtime import ClientState
from feddiff.compress import wire
from feddiff.compress.wire import Message
from feddiff.config import Config, load_resolved
from feddiff.engines.progress import RoundProgress
from feddiff.engines.transport import LocalTransport
from feddiff.evaluate import Evaluator, build_quality, load_feature_network
from feddiff.experiment import Experiment, build_experiment, link_spec, load_split, partition_record
from feddiff.metrics.cost import architecture_signature, model_cost
from feddiff.metrics.fid import FeatureStats
from feddiff.metrics.ledger import Ledger
from feddiff.metrics.quality import extract_features
from feddiff.model.presets import count_parameters
from feddiff.runs import RunDir, RunError

LINK = "client-server"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


class Simulator:
    """Runs an :class:`Experiment` round by round in this process."""

    def __init__(self, exp: Experiment, run_dir: RunDir):
        self.exp = exp
        self.cfg: Config = exp.cfg
        self.run_dir = run_dir
        self.ledger = Ledger()
        comp = self.cfg.compress
        self.transport = LocalTransport(self.ledger, link_spec(comp.downlink), link_spec(comp.uplink),
                                        self.cfg.run.seed)
        self.clients = [ClientState() for _ in range(exp.num_clients)]
        self.evaluator = Evaluator(
            self.cfg.eval, exp.scheduler, exp.test.images if exp.test is not None else None,
            self.cfg.run.seed, exp.device, self.cfg.diffusion.loss,
        )
        self._quality_ready = False
        self.start_round = 0
        self.elapsed_s = 0.0
        self.arch = ""  # signature of the last architecture whose cost was recorded

    # -- start or resume ---------------------------------------------------------------------
    def prepare_quality(self, count_bytes: bool) -> None:
        """Feature network and reference statistics for FD / KID / IS (when eval.fid_num_samples > 0).

        With ``eval.federated_reference`` every client computes the feature sums of its own train
        images and sends only those (counted on the ``eval`` link), never an image.
        """
        cfg, exp = self.cfg, self.exp
        if cfg.eval.fid_num_samples == 0 or self._quality_ready:
            return
        net = load_feature_network(cfg, exp.device, log=lambda m: print(m, flush=True))
        if cfg.eval.federated_reference:
            total = None
            for k, images in enumerate(exp.client_images):
                stats = FeatureStats.from_features(extract_features(net, images))  # on the client
                sums = {"n": torch.tensor(stats.n, dtype=torch.float64), "sum": torch.from_numpy(stats.sum),
                        "outer": torch.from_numpy(stats.outer)}
                blob = wire.encode(Message(sums))
                if count_bytes:
                    self.ledger.record("eval", "up", f"client{k}", len(blob))
                got = wire.decode(blob).tensors  # on the server: sums only
                part = FeatureStats(float(got["n"]), got["sum"].numpy(), got["outer"].numpy())
                total = part if total is None else total + part
            quality = build_quality(cfg, net, None, total)
        else:
            ref = load_split(cfg, cfg.eval.reference_split)
            quality = build_quality(cfg, net, ref.images)
        self.evaluator.quality = quality
        self._quality_ready = True

    def initialize(self) -> None:
        """A fresh run: the initial global model, the partition and the manifest on disk."""
        self.prepare_quality(count_bytes=True)
        self.exp.strategy.initialize(self.exp.model.state_dict())
        rd = self.run_dir
        rd.write_json("config.json", self.cfg.model_dump(mode="json"))
        rd.write_json("partition.json", partition_record(self.cfg, self.exp.train, self.exp.parts))
        rd.write_json("manifest.json", self._manifest())

    def restore(self, rnd: int | None = None) -> int:
        """Load the checkpoint after round ``rnd`` (default: the newest readable one); returns its round."""
        if rnd is None:
            damaged: list[tuple[Path, str]] = []
            found = self.run_dir.latest_checkpoint(damaged)
            if found is None:
                why = "".join(f"\n  {reason}" for _, reason in damaged)
                raise RunError(f"{self.run_dir.path} has no readable checkpoint to resume from{why}")
            for path, reason in damaged:
                kept = self.run_dir.set_aside(path)
                print(f"warning: {reason}\n  kept it as {kept.name}; resuming from round {found[0]}",
                      file=sys.stderr, flush=True)
        else:
            paths = dict(self.run_dir.checkpoints())
            if rnd not in paths:
                raise RunError(f"{self.run_dir.path} has no checkpoint of round {rnd}; "
                               f"kept rounds: {sorted(paths) or 'none'} (run.keep_checkpoints)")
            found = self.run_dir.load_checkpoint(paths[rnd])
        rnd, tensors, state = found
        strat = {k.removeprefix("strategy/"): v for k, v in tensors.items() if k.startswith("strategy/")}
        self.exp.strategy.load_state_dict(strat, state["strategy"])
        for k, meta in state["clients"].items():
            self.clients[int(k)] = ClientState.from_flat(tensors, meta, f"client/{k}/")
        self.ledger.load_state_dict(state["ledger"])
        self.transport.load_state_dict({k.removeprefix("transport/"): v for k, v in tensors.items()
                                        if k.startswith("transport/")})
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.arch = state.get("arch", "")
        return rnd

    def resume(self) -> None:
        """Restore the state after the last checkpoint; metrics of later rounds are redone."""
        self.start_round = self.restore()
        self.run_dir.truncate_metrics(self.start_round)
        self.prepare_quality(count_bytes=False)  # its bytes were counted when the run started

    def checkpoint(self, rounds_done: int) -> None:
        tensors, strat_meta = self.exp.strategy.state_dict()
        tensors = {f"strategy/{k}": v for k, v in tensors.items()}
        tensors.update({f"transport/{k}": v for k, v in self.transport.state_dict().items()})
        clients_meta = {}
        for k, st in enumerate(self.clients):
            flat, meta = st.to_flat(f"client/{k}/")
            tensors.update(flat)
            clients_meta[str(k)] = meta
        state = {"strategy": strat_meta, "clients": clients_meta, "ledger": self.ledger.state_dict(),
                 "elapsed_s": self.elapsed_s, "arch": self.arch}
        self.run_dir.save_checkpoint(rounds_done, tensors, state, keep=self.cfg.run.keep_checkpoints)

    # -- the round loop ----------------------------------------------------------------------
    def run(self) -> RunDir:
        cfg, exp = self.cfg, self.exp
        num_rounds = cfg.run.num_rounds
        progress = RoundProgress(cfg.run.progress, num_rounds, self.start_round)
        progress.message(self._banner())
        try:
            for rnd in range(self.start_round, num_rounds):
                t_round = time.perf_counter()
                # Configure: what each sampled client receives
                tasks = exp.strategy.configure(rnd)
                total_steps = sum(exp.runtime.spec.num_steps(len(exp.parts[t.client])) for t in tasks)
                progress.start_round(rnd, [t.client for t in tasks], total_steps)

                # Local training, one client after another, every message through the transport
                replies, client_rows = [], []
                t_train = time.perf_counter()
                for i, task in enumerate(tasks):
                    progress.start_client(task.client, i, len(tasks))
                    replies.append(self._client_round(task, rnd, progress.step))
                    progress.client_done(task.client, replies[-1].metrics["loss"])
                t_train = time.perf_counter() - t_train

                # Aggregate
                t_agg = time.perf_counter()
                agg_metrics = exp.strategy.aggregate(rnd, replies)
                t_agg = time.perf_counter() - t_agg
                comm = self.ledger.close_round()

                # Evaluate (every N rounds and after the last)
                t_eval = time.perf_counter()
                last = rnd + 1 == num_rounds
                every = cfg.eval.every_rounds
                evaluation = self._evaluate(rnd + 1, last) if last or (every and (rnd + 1) % every == 0) else None
                t_eval = time.perf_counter() - t_eval

                # Record the round, then checkpoint (a resume redoes rounds after the checkpoint)
                t_round = time.perf_counter() - t_round
                self.elapsed_s += t_round
                for task, r in zip(tasks, replies):  # the round's own messages; evaluation traffic is its own link
                    node = comm["bytes_per_node"].get(task.link, {}).get(f"client{r.client}", {})
                    client_rows.append({"id": r.client, "num_samples": r.num_samples, **r.metrics,
                                        "bytes_down": node.get("down", 0), "bytes_up": node.get("up", 0)})
                n_total = sum(r.num_samples for r in replies)
                loss = sum(r.metrics["loss"] * r.num_samples for r in replies) / n_total
                record: dict[str, Any] = {
                    "round": rnd + 1, "loss": loss, "clients": client_rows, **agg_metrics,
                    **{k: v for k, v in comm.items() if k != "bytes_per_node"},
                    "time_s": {"train": t_train, "aggregate": t_agg, "eval": t_eval, "round": t_round},
                    "elapsed_s": self.elapsed_s,
                }
                if evaluation is not None:
                    record["eval"] = evaluation
                cost = self._cost_if_changed()
                if cost is not None:
                    record["model_cost"] = cost
                self.run_dir.append_metrics(record)
                every_ckpt = cfg.run.checkpoint_every
                if last or (every_ckpt and (rnd + 1) % every_ckpt == 0):
                    self.checkpoint(rnd + 1)
                progress.end_round(rnd, self._round_line(record, num_rounds))
        finally:
            progress.close()
        progress.message(f"run folder: {self.run_dir.path}")
        return self.run_dir

    def _client_round(self, task, rnd: int, on_step) -> Reply:
        exp, state = self.exp, self.clients[task.client]
        node = f"client{task.client}"
        down = self.transport.to_client(task.link, node, Message(task.tensors, {"config": task.config}), state, rnd)
        tensors, n, metrics = exp.runtime.handle(
            task.client, down.tensors, down.meta["config"], state, exp.client_images[task.client], progress=on_step,
        )
        reply = Message(tensors, {"num_samples": n, "metrics": metrics})
        up = self.transport.to_server(task.link, node, reply, down.tensors, state, rnd)
        return Reply(task.client, up.tensors, int(up.meta["num_samples"]), up.meta["metrics"])

    def eval_models(self) -> dict[str, dict[str, torch.Tensor]]:
        """What to evaluate: the global model, or each client's personal model (UDEC, ULATDEC)."""
        strategy = self.exp.strategy
        if not strategy.personalized:
            return {"global": strategy.global_state()}
        return {f"client{k}": strategy.personal_model(st.personal)
                for k, st in enumerate(self.clients) if st.personal is not None}

    def _evaluate(self, rounds_done: int, last: bool, prefix: str = "round") -> dict[str, Any]:
        model, samples = self.exp.model, self.run_dir.path / "samples"
        results: dict[str, dict[str, Any]] = {}
        for name, state in self.eval_models().items():
            model.load_state_dict(state)
            tag = f"{prefix}-{rounds_done:04d}" + ("" if name == "global" else f"-{name}")
            results[name] = self.evaluator(model, samples, tag)
            if last:
                results[name].update(self._finalize(name, results[name]))
        if list(results) == ["global"]:
            return results["global"]
        first = next(iter(results.values()))
        shared = {k: first[k] for k in ("label", "protocol") if k in first}
        return {"models": results, **shared, **summarize(results)}

    def _finalize(self, name: str, result: dict[str, Any]) -> dict[str, str]:
        """After the last round: samples/final*.png and the exported pipeline."""
        out = {}
        suffix = "" if name == "global" else f"-{name}"
        if "grid" in result:
            src = self.run_dir.path / result["grid"]
            dst = self.run_dir.path / "samples" / f"final{suffix}.png"
            dst.write_bytes(src.read_bytes())
            out["final_grid"] = str(dst.relative_to(self.run_dir.path))
        target = self.run_dir.model_path if name == "global" else self.run_dir.path / "models" / name
        DDPMPipeline(unet=self.exp.model, scheduler=self.exp.scheduler).save_pretrained(target, safe_serialization=True)
        out["model"] = str(target.relative_to(self.run_dir.path))
        return out

    def _cost_if_changed(self) -> dict[str, Any] | None:
        """Parameters and MACs of the global model, recorded at the start and whenever its shape changes."""
        state = self.exp.strategy.global_state()
        sig = architecture_signature(state)
        if sig == self.arch:
            return None
        self.arch = sig
        return model_cost(self.exp.model, self.exp.train.channels, self.cfg.data.image_size)

    # -- text --------------------------------------------------------------------------------
    def _manifest(self) -> dict[str, Any]:
        exp = self.exp
        return {
            "feddiff": feddiff.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": str(exp.device), "threads": torch.get_num_threads(),
            "seed": self.cfg.run.seed, "partition_hash": partition_record(self.cfg, exp.train, exp.parts)["hash"],
            "model": model_cost(exp.model, exp.train.channels, self.cfg.data.image_size),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _banner(self) -> str:
        exp, cfg = self.exp, self.cfg
        sizes = [len(p) for p in exp.parts]
        return (
            f"[bold]feddiff[/bold] {cfg.algorithm.name} | {cfg.data.dataset} {cfg.data.image_size}px, "
            f"{exp.num_clients} clients ({cfg.partition.method}, sizes {min(sizes)}..{max(sizes)}) | "
            f"{cfg.model.preset} U-Net {count_parameters(exp.model) / 1e6:.2f}M params | {exp.device} | "
            f"rounds {self.start_round + 1}..{cfg.run.num_rounds} -> {self.run_dir.path}"
        )

    @staticmethod
    def _round_line(rec: dict[str, Any], num_rounds: int) -> str:
        b = rec["bytes"].get(LINK, {"down": 0, "up": 0})
        line = (f"round {rec['round']:>3}/{num_rounds}  loss {rec['loss']:.4f}  clients {len(rec['clients'])}  "
                f"down {_fmt_bytes(b['down'])}  up {_fmt_bytes(b['up'])}  {rec['time_s']['round']:.1f}s")
        if "eval" in rec:
            ev = rec["eval"]
            if "heldout_loss" in ev:
                line += f"  heldout {ev['heldout_loss']:.4f}"
            if "heldout_loss_mean" in ev:
                line += f"  heldout {ev['heldout_loss_mean']:.4f} (mean of {len(ev['models'])} personal models)"
            if "fd" in ev:
                line += f"  {ev['label']} {ev['fd']:.2f}"
            if "fd_mean" in ev:
                line += f"  {ev['label']} {ev['fd_mean']:.2f} ± {ev['fd_std']:.2f}"
            if "grid" in ev:
                line += f"  grid {ev['grid']}"
        return line


def evaluate_checkpoint(path: str | Path, rnd: int | None, overrides: list[str]) -> dict[str, Any]:
    """Evaluate a run's checkpoint with eval.* overrides; appends the result to ``evals.jsonl``."""
    from feddiff.config import ConfigError, config_from_dict, parse_override, _set_path

    run_dir = RunDir.open(path)
    raw = load_resolved(run_dir.config_path).model_dump(mode="json")
    for text in overrides:
        key, value = parse_override(text)
        if key[0] != "eval":
            raise ConfigError(f"feddiff eval changes eval.* settings only, not {'.'.join(key)}")
        _set_path(raw, key, value)
    cfg = config_from_dict(raw, f"{run_dir.config_path} with {' '.join(overrides)}")
    sim = Simulator(build_experiment(cfg), run_dir)
    t = time.perf_counter()
    done = sim.restore(rnd)
    sim.prepare_quality(count_bytes=False)
    result = sim._evaluate(done, last=False, prefix="eval")
    record = {"round": done, "eval": result, "eval_s": time.perf_counter() - t,
              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": list(overrides)}
    with open(run_dir.path / "evals.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean and spread over models (personal models: the papers report the mean over clients)."""
    out: dict[str, float] = {}
    keys = {k for r in results.values() for k, v in r.items() if isinstance(v, (int, float))}
    for k in sorted(keys):
        values = torch.tensor([float(r[k]) for r in results.values() if k in r], dtype=torch.float64)
        out[f"{k}_mean"] = float(values.mean())
        out[f"{k}_std"] = float(values.std()) if len(values) > 1 else 0.0
        out[f"{k}_min"], out[f"{k}_max"] = float(values.min()), float(values.max())
    return out


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
RESUMABLE_OVERRIDES = ("run.num_rounds", "run.progress", "run.checkpoint_every", "run.keep_checkpoints", "eval.")


def resume(path: str | Path, overrides: list[str] = ()) -> RunDir:
    """Continue a run from its last checkpoint (optionally with more rounds: run.num_rounds=N)."""
    from feddiff.config import ConfigError, config_from_dict, parse_override, _set_path

    run_dir = RunDir.open(path)
    cfg = load_resolved(run_dir.config_path)
    notes: list[str] = []
    if overrides:
        raw = cfg.model_dump(mode="json")
        for text in overrides:
            key, value = parse_override(text)
            dotted = ".".join(key)
            if not any(dotted == k or (k.endswith(".") and dotted.startswith(k)) for k in RESUMABLE_OVERRIDES):
                raise ConfigError(
                    f"--set {dotted} cannot change on resume (it would change the training math); "
                    f"allowed: {', '.join(RESUMABLE_OVERRIDES)}"
                )
            _set_path(raw, key, value)
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
        raise RunError(
            f"{run_dir.path} already finished all {cfg.run.num_rounds} rounds; "
            "extend it with --set run.num_rounds=N"
        )
    if overrides:  # only once the resume is known to go ahead
        run_dir.write_json("config.json", cfg.model_dump(mode="json"))
        for note in notes:
            print(note, flush=True)
    return sim.run()
