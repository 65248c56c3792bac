"""The embedded in-process simulator: the default engine.

Clients run one after another in this process, each through exactly what a client process does with
bytes (``client/node.py``): every task and reply is serialized, so the ledger counts what a distributed
engine would send. The round loop is not here but in ``engines/loop.py``, shared with every engine;
this module supplies its ``send_and_receive`` and keeps the clients' records (checkpointed with the
server's state). All randomness derives from (seed, round, client), so a run killed at any moment and
resumed from its last checkpoint ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import platform
import sys
import threading
import time
from typing import Any

import diffusers
import torch

import feddiff
from feddiff.client.node import ClientData, ClientNode
from feddiff.client.runtime import ClientState
from feddiff.compress.link import ClientLink
from feddiff.config import Config, ConfigError
from feddiff.engines.loop import EVAL_LINK, Incoming, Outgoing, RoundEvents, Server
from feddiff.engines.evaluate import Evaluator, build_quality, load_feature_network
from feddiff.engines.experiment import Experiment, ModelCache, load_split
from feddiff.metrics.cost import model_cost
from feddiff.metrics.fid import FeatureStats
from feddiff.metrics.quality import extract_features, load_stats, save_stats
from feddiff.runs import RunDir, RunError
from feddiff.types import StateDict

__all__ = ["Simulator", "SimulatorEngine", "check_partition", "feature_sums"]

class SimulatorEngine:
    """Clients in this process: their records, their data, one :class:`ClientNode` for all.

    Parameters
    ----------
    exp
        The experiment (client data and runtime).
    """

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.clients = [ClientState() for _ in range(exp.num_clients)]
        self.round, self.before = None, {}  # this round's replaced records, while it may still not count
        self.shared_before = None
        self.node = ClientNode(exp.runtime, ClientLink(exp.links, exp.cfg.run.seed))

    def send_and_receive(self, rnd: int, messages: list[Outgoing], events: RoundEvents) -> list[Incoming]:
        """Run each addressed client on its message, one after another; an exception is that client's failure."""
        out = []
        shared = self.node.runtime.shared  # train.optimizer_scope = "shared": one record every client changes
        if rnd != self.round:  # records from before this round, for a round that will not count
            self.round, self.before = rnd, {}
            self.shared_before = shared.copy() if shared is not None else None
        faults = self.exp.cfg.faults
        deadline, stall = (faults.deadline_s, faults.stall_s) if rnd >= 0 else (0, 0)  # queries are not rounds
        for i, m in enumerate(messages):
            events.start(m.client, i, len(messages))
            record = self.clients[m.client].copy()  # a client that fails mid-round keeps its old record
            shared_snapshot = self.node.runtime.shared.copy() if self.node.runtime.shared is not None else None
            try:
                if deadline or stall:
                    blob = self._watched(m, record, events.step, deadline, stall)
                else:
                    blob = self.node.handle(m.client, m.blob, record, self.exp.client_data[m.client],
                                            progress=events.step)
                inc = Incoming(m.client, blob)
                self.before.setdefault(m.client, self.clients[m.client])
                self.clients[m.client] = record
            except Exception as err:  # noqa: BLE001 - a client's failure is reported, not the run's end
                inc = Incoming(m.client, error=f"{type(err).__name__}: {err}")
                if shared_snapshot is not None:  # nor does it advance the optimizer every client shares
                    self.node.runtime.shared = shared_snapshot
            events.done(inc)
            out.append(inc)
        return out

    def _watched(self, m: Outgoing, record: ClientState, step, deadline: float, stall: float) -> bytes:
        """Run one client on a worker thread, watched: past ``deadline`` seconds, or ``stall`` seconds without
        a training step, it is given up (TimeoutError). A client that keeps stepping is never declared hung.

        A thread cannot be stopped: one given up runs on in the background on a copy of the record and its
        own working model (the others get a fresh one), and whatever it produces is thrown away.
        """
        box: dict[str, Any] = {}
        finished = threading.Event()
        last = [time.monotonic()]

        def beat() -> None:
            last[0] = time.monotonic()
            step()

        def work() -> None:
            try:
                box["blob"] = self.node.handle(m.client, m.blob, record, self.exp.client_data[m.client], progress=beat)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = err
            finally:
                finished.set()

        start = time.monotonic()
        threading.Thread(target=work, name=f"feddiff-client-{m.client}", daemon=True).start()
        while not finished.wait(0.02):
            now = time.monotonic()
            why = None
            if deadline and now - start > deadline:
                why = f"no reply within faults.deadline_s = {deadline:g} s"
            elif stall and now - last[0] > stall:
                why = f"hung: no training step for {stall:g} s (faults.stall_s)"
            if why:
                cache = self.node.runtime.model_for  # the abandoned thread keeps the working model it has
                if isinstance(cache, ModelCache):
                    self.node.runtime.model_for = ModelCache(cache.device, cache.seed)
                print(f"warning: client {m.client} was given up ({why}); its training may still run in the "
                      "background, and what it produces is discarded", file=sys.stderr, flush=True)
                raise TimeoutError(why)
        if "error" in box:
            raise box["error"]
        return box["blob"]

    def rollback(self, rnd: int, clients: list[int], whole_round: bool = False) -> None:
        """Put ``clients`` back to their records from before round ``rnd``: its replies were discarded
        (``whole_round``: the round did not count, so the shared optimizer goes back too), or they are
        asked again."""
        if rnd != self.round:
            raise RuntimeError(f"rollback of round {rnd}, but the records kept are from round {self.round}")
        for c in clients:
            if c in self.before:
                self.clients[c] = self.before.pop(c)
        if whole_round and self.shared_before is not None:
            self.node.runtime.shared = self.shared_before.copy()

    def answer_feature_sums(self, net) -> None:
        """Let clients answer the ``feature_sums`` query (federated reference statistics) with ``net``."""
        self.node.answers["feature_sums"] = lambda data: feature_sums(net, data)

    def personal_models(self) -> dict[int, tuple[dict[str, Any] | None, StateDict]]:
        """Each client's (model spec, personal model) (UDEC/ULATDEC), from the records this engine keeps."""
        return {k: (st.spec, st.personal) for k, st in enumerate(self.clients) if st.personal is not None}

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        """Every client's record, as ``client/<k>/...`` tensors and per-client JSON."""
        tensors: StateDict = {}
        meta = {}
        for k, st in enumerate(self.clients):
            flat, m = st.to_flat(f"client/{k}/")
            tensors.update(flat)
            meta[str(k)] = m
        shared = self.node.runtime.shared
        if shared is not None:  # train.optimizer_scope = "shared": the one optimizer every client uses
            flat, m = shared.to_flat("shared/")
            tensors.update(flat)
            meta["shared"] = m
        return tensors, meta

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        """Restore the records :meth:`state_dict` wrote."""
        for k, m in meta.items():
            if k == "shared":
                self.node.runtime.shared = ClientState.from_flat(tensors, m, "shared/")
            else:
                self.clients[int(k)] = ClientState.from_flat(tensors, m, f"client/{k}/")

class Simulator:
    """A run in this process: the shared round loop (:class:`~feddiff.engines.loop.Server`) over a
    :class:`SimulatorEngine`."""

    def __init__(self, exp: Experiment, run_dir: RunDir, engine=None):
        self.exp = exp
        self.cfg: Config = exp.cfg
        self.run_dir = run_dir
        # the clients: in this process (the simulator), or another engine's (Flower's nodes)
        self.engine = engine if engine is not None else SimulatorEngine(exp)
        evaluator = Evaluator(self.cfg.eval, exp.scheduler, exp.test.images if exp.test is not None else None,
                              self.cfg.run.seed, exp.device, self.cfg.diffusion.loss)
        self.server = Server(exp, run_dir, evaluator)
        self._quality_ready = False

    # -- reference statistics for FD / KID / IS --------------------------------------------
    def prepare_quality(self, engine=None) -> None:
        """Feature network and reference statistics (when eval.fid_num_samples > 0).

        With ``eval.federated_reference`` the server asks every client for the feature sums of its own
        train images (a query on the ``eval`` link, counted), never an image; the summed statistics are kept
        in the run folder, so a resume or ``feddiff eval`` does not ask again.
        """
        cfg, exp = self.cfg, self.exp
        if cfg.eval.fid_num_samples == 0 or self._quality_ready:
            return
        try:
            net = load_feature_network(cfg, exp.device, log=lambda m: print(m, flush=True))
            ref = load_split(cfg, cfg.eval.reference_split) if not cfg.eval.federated_reference else None
        except FileNotFoundError as err:
            if exp.declared is None:
                raise
            raise ConfigError(
                f"the nodes hold their own data, and FD/KID on the server needs a {cfg.data.dataset} train split of "
                f"its own (data.root = {cfg.data.root!r}) for eval.feature_net = \"domain\" or eval.reference_split "
                f"= \"train\": {err}. Give the server one, or set eval.feature_net = \"inception\" (with "
                f"eval.inception_weights) and eval.reference_split = \"test\", or eval.fid_num_samples = 0") from None
        if cfg.eval.federated_reference:
            # asked once per run and kept in the run folder: a resume or `feddiff eval` sends nothing again
            kept = self.run_dir.path / f"federated-reference-{net.name}-{str(net.weights_id)[:16]}.npz"
            if kept.exists():
                total = load_stats(kept)
            else:
                self.engine.answer_feature_sums(net)
                answers = self.server.query(engine or self.engine, ["feature_sums"], EVAL_LINK,
                                            list(range(exp.num_clients)))
                total = None
                for _, got in sorted(answers.items()):
                    part = FeatureStats(float(got["feature_sums/n"]), got["feature_sums/sum"].numpy(),
                                        got["feature_sums/outer"].numpy())
                    total = part if total is None else total + part
                save_stats(kept, total)
            quality = build_quality(cfg, net, None, total)
        else:
            quality = build_quality(cfg, net, ref.images)
        self.server.evaluator.quality = quality
        self._quality_ready = True

    # -- start or resume -------------------------------------------------------------------
    def initialize(self) -> None:
        """A fresh run: the initial global model, the partition and the manifest on disk."""
        self.exp.strategy.initialize(self.exp.model.state_dict(), self.exp.spec)
        rd = self.run_dir
        rd.write_json("config.json", self.cfg.model_dump(mode="json"))
        rd.write_json("partition.json", self.exp.partition_record())
        rd.write_json("manifest.json", self._manifest())

    def restore(self, rnd: int | None = None) -> int:
        """Load the checkpoint after round ``rnd`` (default: the newest readable one); returns its round."""
        check_partition(self.run_dir, self.exp.partition_hash())
        return self.server.restore(self.engine, rnd)

    def resume(self) -> None:
        """Restore the state after the last checkpoint; metrics of later rounds are redone."""
        for p in self.run_dir.clean_stale_temps():  # what a process killed while writing left behind
            print(f"note: removed {p.relative_to(self.run_dir.path)}, a file half-written by a killed run",
                  flush=True)
        self.server.start_round = self.restore()
        self.run_dir.truncate_metrics(self.server.start_round)

    @property
    def start_round(self) -> int:
        return self.server.start_round

    def run(self) -> RunDir:
        """The rounds left; returns the run folder."""
        run_dir = self.server.run(self.engine, reference=lambda engine: self.prepare_quality(engine))
        self.end_phases()
        return run_dir

    def end_phases(self, only_missing: bool = False) -> list[str]:
        """What a run ends with after its last round: personalised fine-tuning, the leakage audit.

        ``only_missing``: only the phases without a record of the last round (a run killed during them,
        resumed). Returns the phases run.
        """
        from feddiff.engines.audit import AUDIT_FILE, run_audit
        from feddiff.engines.personalize import PHASE_FILE, run_phase

        rounds, ran = self.cfg.run.num_rounds, []
        log = lambda m: print(m, flush=True)  # noqa: E731
        for name, wanted, file, phase in (
                ("personalize", self.cfg.personalize.steps > 0, PHASE_FILE,
                 lambda: run_phase(self, rounds, self.cfg.personalize, log=log)),
                ("audit", self.cfg.audit.enabled, AUDIT_FILE, lambda: run_audit(self, rounds, self.cfg.audit, log=log))):
            if wanted and not (only_missing and self.run_dir.phase_rounds(file) == rounds):
                phase()
                ran.append(name)
        return ran

    def evaluate(self, rounds_done: int, prefix: str = "eval") -> dict[str, Any]:
        """Evaluate the current state (``feddiff eval``), without exporting."""
        self.prepare_quality()
        return self.server.evaluate(rounds_done, False, self.engine, prefix=prefix)

    def _manifest(self) -> dict[str, Any]:
        exp = self.exp
        return {
            "feddiff": feddiff.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": str(exp.device), "threads": torch.get_num_threads(),
            "seed": self.cfg.run.seed, "partition_hash": exp.partition_hash(),
            "model": model_cost(exp.model, exp.channels, self.cfg.data.image_size),
            "model_spec": exp.spec.to_json(),
            "engine": "simulator" if isinstance(self.engine, SimulatorEngine) else type(self.engine).__name__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

def feature_sums(net, data: ClientData) -> StateDict:
    """A client's answer to the ``feature_sums`` query: n, the sum and the outer-product sum of its features."""
    stats = FeatureStats.from_features(extract_features(net, data.images))
    return {"n": torch.tensor(stats.n, dtype=torch.float64), "sum": torch.from_numpy(stats.sum),
            "outer": torch.from_numpy(stats.outer)}


def check_partition(run_dir: RunDir, current: str) -> None:
    """Refuse to continue a run whose data now partitions differently (changed or replaced data files)."""
    path = run_dir.path / "partition.json"
    try:
        saved = json.loads(path.read_text())["hash"]
    except (OSError, ValueError, KeyError) as err:
        raise RunError(f"cannot read the saved partition {path}: {err}") from None
    if saved != current:
        raise RunError(
            f"the data no longer gives the partition this run trained on: {path} has hash {saved[:12]}..., "
            f"the data files now give {current[:12]}... (were data.root's files changed or replaced?); "
            "restore the original files, or start a new run"
        )
