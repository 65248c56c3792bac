"""The round loop, written once for every engine: the server side of a federated run.

An engine supplies one thing, :meth:`Engine.send_and_receive` (shaped like Flower's
``Grid.send_and_receive``): deliver each outgoing message's bytes to its client and return each
client's reply bytes, or the reason there is none. Everything else happens here, the same for the
in-process simulator and for Flower:

    setup: ask clients for what the strategy needs (label histograms) and for federated reference
           statistics, through the links, counted in the ledger (``bytes_setup`` of the next round)
    per round: configure -> encode (server link) -> send_and_receive -> decode -> validate -> aggregate
               -> exchanges between server tiers (through the links) -> evaluate -> metrics -> checkpoint

A reply that cannot be decoded or fails :func:`~feddiff.engines.validate.validate_reply` is a
rejection: recorded with its reason, never aggregated. A round with no usable reply leaves the global
model as it was.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from feddiff.algorithms.base import Failure, Reply, Task, Transfer
from feddiff.client.node import PERSONAL_QUERY, QUERY_ROUND
from feddiff.compress.link import ServerLink, pack, unpack
from feddiff.compress.wire import Message, MessageError
from feddiff.engines.progress import RoundProgress
from feddiff.engines.tensorboard import ScalarWriter
from feddiff.engines.validate import validate_reply
from feddiff.metrics.cost import architecture_signature, model_cost
from feddiff.metrics.ledger import EVAL_LINK, Ledger, training_bytes
from feddiff.model.export import save_pipeline
from feddiff.model.spec import ModelSpec
from feddiff.prune.structure import to_spec
from feddiff.runs import RunDir, RunError
from feddiff.types import StateDict, client_node, under

if TYPE_CHECKING:
    from feddiff.engines.experiment import Experiment

LINK = "client-server"


@dataclass
class Outgoing:
    """One message to a client: its bytes and the link it travels on."""

    client: int
    link: str
    blob: bytes


@dataclass
class Incoming:
    """A client's answer: its reply bytes, or why there are none."""

    client: int
    blob: bytes | None = None
    error: str | None = None


@dataclass
class RoundEvents:
    """What an engine reports while a round runs (progress display only)."""

    start: Callable[[int, int, int], None] = lambda client, index, count: None
    step: Callable[[], None] = lambda: None
    done: Callable[[Incoming], None] = lambda incoming: None


class Engine(Protocol):
    """What the round loop needs of an engine."""

    def send_and_receive(self, rnd: int, messages: list[Outgoing], events: RoundEvents) -> list[Incoming]:
        """Deliver every message and return one :class:`Incoming` per message, in any order."""

    def personal_models(self) -> dict[int, tuple[dict[str, Any] | None, StateDict]] | None:
        """Clients' (model spec JSON, personal model), for evaluating personalized strategies; spec None: the
        spec the config builds. None: the clients keep them, and the server asks for them (a query)."""

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        """Client records the engine keeps for the server's checkpoint (({}, {}) when the clients keep them)."""

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@dataclass
class RoundResult:
    """The decoded and validated outcome of one round's messages."""

    replies: list[Reply] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


class Server:
    """The server side of a run: strategy, links, ledger, evaluation, run folder; engine-agnostic.

    Parameters
    ----------
    exp
        The assembled experiment (the server reads its config, strategy, model builder, evaluator
        inputs and the clients' known sizes; never a client's data).
    run_dir
        The run folder.
    evaluator
        Held-out loss, grids and FD/KID/IS (``evaluate.Evaluator``).
    """

    def __init__(self, exp: Experiment, run_dir: RunDir, evaluator):
        self.exp = exp
        self.cfg = exp.cfg
        self.strategy = exp.strategy
        self.run_dir = run_dir
        self.scalars: ScalarWriter | None = None  # TensorBoard (run.tensorboard), made when the run starts
        self.evaluator = evaluator
        self.ledger = Ledger()
        self.link = ServerLink(exp.links, self.cfg.run.seed, self.ledger.record)
        self.sent_spec: dict[str, str] = {}  # node -> id of the model spec it holds (absent: the base spec)
        self.start_round = 0
        self.elapsed_s = 0.0
        self.arch = ""  # signature of the last architecture whose cost was recorded
        self.info_received = False
        self.setup_bytes: dict[str, Any] | None = None

    # -- setup: what the strategy and evaluation need from clients before round 1 -----------
    def query(self, engine: Engine, names: list[str], link: str, clients: list[int]) -> dict[int, StateDict]:
        """Ask ``clients`` for ``names`` (label_histogram, feature_sums, ...); their answers by client."""
        out = []
        for c in clients:
            blob, _ = self.link.send(link, client_node(c), Message({}, {"query": names}), QUERY_ROUND)
            out.append(Outgoing(c, link, blob))
        answers: dict[int, StateDict] = {}
        asked = set(clients)
        limit = query_limit(self.strategy.global_state())
        for inc in engine.send_and_receive(QUERY_ROUND, out, RoundEvents()):
            if inc.client not in asked or inc.client in answers:
                continue  # an answer nobody asked for, or a second one: ignored
            if inc.error is not None or inc.blob is None:
                raise RunError(f"client {inc.client} did not answer the query {names}: {inc.error}")
            self.link.count(link, "up", client_node(inc.client), len(inc.blob))
            if len(inc.blob) > limit:  # refused before a byte of it is parsed
                raise RunError(f"client {inc.client}'s answer to the query {names} is {len(inc.blob)} bytes, over "
                               f"the limit of {limit} (twice the model at fp32, plus 64 MiB for statistics)")
            try:
                answers[inc.client] = self.link.receive(inc.blob, {}).tensors
            except MessageError as err:
                raise RunError(f"client {inc.client}'s answer to the query {names} is unreadable: {err}") from None
        missing = sorted(asked - set(answers))
        if missing:
            raise RunError(f"clients {missing} did not answer the query {names}")
        return answers

    def setup(self, engine: Engine, reference: Callable[[Engine], None] | None = None) -> None:
        """Collect what the strategy declared it needs (once per run) and federated reference statistics."""
        needs = list(self.strategy.needs)
        if needs and not self.info_received:
            answers = self.query(engine, needs, self.strategy.client_link, list(range(self.exp.num_clients)))
            for c, tensors in sorted(answers.items()):
                lacking = [n for n in needs if n not in tensors]
                if lacking:
                    raise RunError(f"client {c}'s answer lacks {lacking} (the strategy needs {needs})")
                self.strategy.receive_info(c, {n: tensors[n] for n in needs})
            self.info_received = True
        if reference is not None:
            reference(engine)
        summary = self.ledger.close_round()
        if summary["bytes"]:
            self.setup_bytes = summary["bytes"]

    # -- one round -------------------------------------------------------------------------
    def _message(self, task: Task, rnd: int) -> Message:
        meta: dict[str, Any] = {"config": task.config}
        spec = self.strategy.spec
        node = client_node(task.client)
        if spec is not None and spec.id != self.sent_spec.get(node, self.exp.spec.id):
            meta["spec"] = spec.to_json()  # the architecture changed since this node last heard
            self.link.forget(node)  # its copy has the old shapes: this message carries weights, not deltas
        return Message(pack(task.tensors, task.extras), meta)

    def _receive(self, task: Task, inc: Incoming, delivered: StateDict, expected: StateDict) -> Reply | Failure:
        if inc.error is not None or inc.blob is None:
            return Failure(task.client, inc.error or "no reply")
        limit = reply_limit(expected, self.strategy.expected_extras(task))
        if len(inc.blob) > limit:  # refused before a byte of it is parsed
            return Failure(task.client, f"rejected: a reply of {len(inc.blob)} bytes exceeds this task's limit of "
                                        f"{limit} (twice its tensors at fp32, plus 1 MiB)")
        try:
            msg = self.link.receive(inc.blob, delivered)
            tensors, extras = unpack(msg.tensors)
            claimed = msg.meta["num_samples"]
            metrics = msg.meta.get("metrics", {})
            if not isinstance(metrics, dict):
                raise MessageError(f"metrics must be a table, got {type(metrics).__name__}")
        except (MessageError, KeyError, TypeError) as err:
            return Failure(task.client, f"undecodable reply: {err}")
        known = self.exp.num_samples[task.client] if self.exp.num_samples is not None else None
        reply = Reply(task.client, tensors, known if known is not None else claimed, metrics, extras,
                      claimed_samples=claimed)
        reason = validate_reply(reply, expected, known, self.strategy.expected_extras(task))
        if reason is not None:
            return Failure(task.client, f"rejected: {reason}")
        if known is None or claimed == known:
            reply.claimed_samples = None
        return reply

    def screen(self, rnd: int, replies: list[Reply]) -> tuple[list[Reply], list[Failure]]:
        """Replies the strategy keeps, and those it refuses before aggregation (robust wrappers: outliers)."""
        if not replies:
            return [], []
        kept, refused = self.strategy.screen(rnd, replies)
        for f in refused:
            self.link.forget(client_node(f.client))
        return kept, refused

    def shortfall(self, tasks: list[Task], replies: list[Reply]) -> str | None:
        """Why the round does not count under ``[faults]``' policy, or None when it does."""
        p = self.cfg.faults
        got = len(replies)
        if not got:
            return "no usable reply"
        if p.policy == "reject" and got < len(tasks):
            return f"{len(tasks) - got} of {len(tasks)} clients gave no usable reply (faults.policy = \"reject\")"
        need = min(p.min_replies, len(tasks))
        if got < need:
            return f"{got} usable replies, fewer than faults.min_replies = {p.min_replies}"
        return None

    def run_round(self, rnd: int, engine: Engine, progress: RoundProgress) -> tuple[list[Task], RoundResult]:
        """Configure, deliver, decode and validate one round; aggregation is the caller's next step."""
        tasks = self.strategy.configure(rnd)
        seen: set[int] = set()
        for t in tasks:
            if t.client in seen:
                raise ValueError(f"{type(self.strategy).__name__}.configure({rnd}) returned two tasks for client "
                                 f"{t.client}; one task per client and round")
            seen.add(t.client)
        return tasks, self.deliver(rnd, tasks, engine, progress)

    def deliver(self, rnd: int, tasks: list[Task], engine: Engine, progress: RoundProgress) -> RoundResult:
        """Send ``tasks``, then decode and validate what comes back (also a retry's tasks)."""
        total_steps = sum(self.exp.steps_per_round(t.client) for t in tasks)
        progress.start_round(rnd, [t.client for t in tasks], total_steps)
        messages, delivered = [], {}
        for task in tasks:
            blob, delivered[task.client] = self.link.send(task.link, client_node(task.client),
                                                          self._message(task, rnd), rnd)
            messages.append(Outgoing(task.client, task.link, blob))
        by_client = {t.client: t for t in tasks}
        global_state = self.strategy.global_state()
        results: dict[int, tuple[Incoming, Reply | Failure]] = {}

        def done(inc: Incoming) -> None:  # decode as each reply comes in, so the live bar shows its loss
            if inc.client not in by_client:
                return  # an answer to nothing this round asked: ignored
            task = by_client[inc.client]
            wanted = self.strategy.expected_upload(task)
            missing = wanted - set(global_state)
            if missing:  # a strategy that expects what it does not hold: a bug, not a client's fault
                raise RuntimeError(f"expected_upload names tensors the global model lacks: {sorted(missing)[:3]}")
            got = self._receive(task, inc, delivered[inc.client], {k: global_state[k] for k in wanted})
            results[inc.client] = (inc, got)
            progress.client_done(inc.client, got.metrics.get("loss", float("nan")) if isinstance(got, Reply)
                                 else float("nan"))

        events = RoundEvents(start=progress.start_client, step=progress.step, done=done)
        for inc in engine.send_and_receive(rnd, messages, events):
            if inc.client not in by_client:
                continue  # an answer to nothing this round asked: ignored
            seen = results.get(inc.client)
            if seen is None or seen[0].blob is not inc.blob or seen[0].error != inc.error:
                done(inc)  # what the engine returns is what counts, whatever it reported on the way
        outcome = RoundResult()
        for task in tasks:  # task order, whatever order the engine answered in
            node = client_node(task.client)
            inc, got = results.get(task.client, (None, Failure(task.client, "no reply")))
            if inc is not None and inc.blob is not None:  # what arrived is counted, usable or not
                self.link.count(task.link, "up", node, len(inc.blob))
            if isinstance(got, Reply):
                outcome.replies.append(got)
                if self.strategy.spec is not None:  # the node now holds this architecture
                    self.sent_spec[node] = self.strategy.spec.id
            else:
                outcome.failures.append(got)
                self.link.forget(node)  # its copy is unknown now: send weights next
        return outcome

    def carry(self, rnd: int, transfers: list[Transfer]) -> list[Transfer]:
        """Carry transfers between server tiers through the links' codecs; the ledger counts them."""
        if not {t.direction for t in transfers} <= {"up", "down"}:
            raise ValueError(f"transfer directions must be 'up' or 'down', got {sorted({t.direction for t in transfers})}")
        out = []
        for t in transfers:
            got = self.link.transfer(t.link, t.direction, t.src, t.dst, Message(t.tensors, dict(t.meta)), rnd)
            out.append(Transfer(t.src, t.dst, t.link, got.tensors, got.meta, t.direction))
        return out

    # -- the loop --------------------------------------------------------------------------
    def run(self, engine: Engine, reference: Callable[[Engine], None] | None = None) -> RunDir:
        """Rounds ``start_round .. run.num_rounds``; returns the run folder."""
        cfg = self.cfg
        num_rounds = cfg.run.num_rounds
        progress = RoundProgress(cfg.run.progress, num_rounds, self.start_round)
        progress.message(self.exp.banner(self.start_round, self.run_dir))
        p = cfg.prune
        if p.ratio > 0 and isinstance(p.at, int) and p.at >= num_rounds:
            warnings.warn(f"prune.at = {p.at} is not before the last round (run.num_rounds = {num_rounds}): these "
                          "rounds train the dense model with the sparsity regulariser and never prune it (a resume "
                          "with a larger run.num_rounds will)", stacklevel=2)
        try:
            # checked before any training: a missing tensorboard package is a clear error, not a late one
            self.scalars = ScalarWriter(self.run_dir.path, self.start_round) if cfg.run.tensorboard else None
            self.setup(engine, reference)
            for rnd in range(self.start_round, num_rounds):
                record = self._round(rnd, engine, progress, last=rnd + 1 == num_rounds)
                progress.end_round(rnd, round_line(record, num_rounds), live_status(record))
        finally:
            progress.close()
            if self.scalars:
                self.scalars.close()
        progress.message(f"run folder: {self.run_dir.path}")
        return self.run_dir

    def _round(self, rnd: int, engine: Engine, progress: RoundProgress, last: bool) -> dict[str, Any]:
        cfg = self.cfg
        t_round = time.perf_counter()
        # Configure and deliver: every message through the server link, replies decoded and validated
        t_train = time.perf_counter()
        # What a round that does not count must undo on the server: the strategy's state (configure may
        # change it: SCAFFOLD's reset, pruning) and which spec each node holds. State tensors are
        # replaced, never written in place, so references suffice.
        before_state, before_specs = self.strategy.state_dict(), dict(self.sent_spec)
        tasks, outcome = self.run_round(rnd, engine, progress)
        order = {t.client: i for i, t in enumerate(tasks)}
        replies, failed = outcome.replies, outcome.failures  # usable replies so far; the last attempt's failures
        kept, refused = self.screen(rnd, replies)
        # The round policy: too few usable replies -> ask the clients that failed again (not those the
        # screening refused: a poisoned update is not a transient fault), then give up
        policy = cfg.faults
        attempts: list[dict[str, Any]] = []
        engine_rollback = getattr(engine, "rollback", None)
        while (short := self.shortfall(tasks, kept)) and len(attempts) < policy.retries and failed:
            attempts.append({"replies": len(kept), "short": short,
                             "failed": [{"id": f.client, "reason": f.reason} for f in failed + refused]})
            again_clients = sorted({f.client for f in failed}, key=order.get)
            if engine_rollback is not None:  # a client that trained and then failed validation starts afresh
                engine_rollback(rnd, again_clients)
            again = self.deliver(rnd, [t for t in tasks if t.client in again_clients], engine, progress)
            replies = sorted(replies + again.replies, key=lambda r: order[r.client])
            failed = again.failures
            kept, refused = self.screen(rnd, replies)  # the whole round's replies, against one median
        outcome.replies, outcome.failures = kept, failed + refused
        discarded: list[int] = []
        if short := self.shortfall(tasks, kept):
            discarded = [r.client for r in kept]
            self.strategy.load_state_dict(*before_state)
            for c in discarded:  # their state goes back to before this round (the model never saw it)
                node = client_node(c)
                self.link.forget(node)
                if node in before_specs:
                    self.sent_spec[node] = before_specs[node]
                else:
                    self.sent_spec.pop(node, None)
            if discarded and engine_rollback is not None:
                engine_rollback(rnd, discarded, whole_round=True)
            outcome.failures += [Failure(c, f"discarded: the round did not count ({short})") for c in discarded]
            outcome.replies = []
        t_train = time.perf_counter() - t_train

        # Aggregate what arrived (nothing arrived: the global model stays), then server-tier exchanges
        t_agg = time.perf_counter()
        agg_metrics: dict[str, Any] = {}
        if outcome.replies:
            agg_metrics = dict(self.strategy.aggregate(rnd, outcome.replies, outcome.failures))
            arrived: list[Transfer] = []
            while transfers := self.strategy.exchange(rnd, arrived):
                arrived = self.carry(rnd, transfers)
            agg_metrics.update(self.strategy.round_metrics(rnd))
        else:
            agg_metrics.update(self.strategy.idle_metrics(rnd))
        if attempts or policy.policy != "quorum" or policy.min_replies > 1:  # the decision, logged per round
            agg_metrics["round_policy"] = {"policy": policy.policy, "min_replies": policy.min_replies,
                                           "attempts": attempts, "counted": not short,
                                           **({"reason": short} if short else {})}
        t_agg = time.perf_counter() - t_agg

        # Evaluate (every N rounds and after the last); what it asks of clients (personal models kept on
        # the nodes) is this round's traffic on the eval link
        t_eval = time.perf_counter()
        every = cfg.eval.every_rounds
        evaluation = self.evaluate(rnd + 1, last, engine) if last or (every and (rnd + 1) % every == 0) else None
        t_eval = time.perf_counter() - t_eval
        comm = self.ledger.close_round()

        # Record the round, then checkpoint (a resume redoes rounds after the checkpoint)
        t_round = time.perf_counter() - t_round
        self.elapsed_s += t_round
        record = self._record(rnd, tasks, outcome, agg_metrics, comm,
                              {"train": t_train, "aggregate": t_agg, "eval": t_eval, "round": t_round})
        if evaluation is not None:
            record["eval"] = evaluation
        cost = self._cost_if_changed()
        if cost is not None:
            record["model_cost"] = cost
        self.run_dir.append_metrics(record)
        if self.scalars:  # with metrics.jsonl, before the checkpoint: a resume after it redoes neither
            self.scalars.add(record)
        every_ckpt = cfg.run.checkpoint_every
        if last or (every_ckpt and (rnd + 1) % every_ckpt == 0):
            self.checkpoint(rnd + 1, engine)
        return record

    def _record(self, rnd: int, tasks: list[Task], outcome: RoundResult, agg_metrics: dict[str, Any],
                comm: dict[str, Any], times: dict[str, float]) -> dict[str, Any]:
        rows = []
        link_of = {t.client: t.link for t in tasks}
        for r in outcome.replies:  # the round's own messages; evaluation traffic is its own link
            node = comm["bytes_per_node"].get(link_of[r.client], {}).get(client_node(r.client), {})
            row = {**r.metrics, "id": r.client, "num_samples": r.num_samples,
                   "bytes_down": node.get("down", 0), "bytes_up": node.get("up", 0)}
            if r.claimed_samples is not None:
                row["claimed_samples"] = r.claimed_samples
            rows.append(row)
        n_total = sum(r.num_samples for r in outcome.replies)
        loss = sum(r.metrics["loss"] * r.num_samples for r in outcome.replies) / n_total if n_total else None
        record: dict[str, Any] = {
            "round": rnd + 1, "loss": loss, "clients": rows, **agg_metrics,
            **{k: v for k, v in comm.items() if k != "bytes_per_node"},
            "time_s": times, "elapsed_s": self.elapsed_s,
        }
        if outcome.failures:
            record["rejected"] = [{"id": f.client, "reason": f.reason} for f in outcome.failures]
            for f in outcome.failures:
                print(f"warning: round {rnd + 1}: client {f.client}: {f.reason}", file=sys.stderr, flush=True)
        if not outcome.replies:
            why = agg_metrics.get("round_policy", {}).get("reason", "no usable reply")
            record["skipped"] = f"{why}; the global model is unchanged"
        if self.setup_bytes is not None:
            record["bytes_setup"] = self.setup_bytes
            self.setup_bytes = None
        return record

    # -- evaluation and export -------------------------------------------------------------
    def eval_models(self, engine: Engine) -> dict[str, StateDict]:
        """What to evaluate: the global model, or each client's personal model (UDEC, ULATDEC)."""
        if not self.strategy.personalized:
            return {"global": self.strategy.global_state()}
        current = self.strategy.spec or self.exp.spec
        out = {}
        held = engine.personal_models()
        if held is None:  # the clients keep them (Flower): asked for, on the eval link, counted
            answers = self.query(engine, [PERSONAL_QUERY], EVAL_LINK, list(range(self.exp.num_clients)))
            held = {c: (None, under(t, f"{PERSONAL_QUERY}/")) for c, t in answers.items() if t}
        if not held:
            warnings.warn("no personal model to evaluate or export: no client has trained yet", stacklevel=2)
        for k, (spec, personal) in sorted(held.items()):
            holds = ModelSpec.from_json(spec) if spec is not None else self.exp.spec
            # a client not reached since the model was pruned: its model as it will be when next reached
            out[client_node(k)] = self.strategy.personal_model(to_spec(personal, holds, current))
        return out

    def working_model(self):
        """The working model of the global model's architecture (weights: whatever it held last)."""
        return self.exp.model_for(self.strategy.spec or self.exp.spec)

    def evaluate(self, rounds_done: int, last: bool, engine: Engine, prefix: str = "round") -> dict[str, Any]:
        """Evaluate (and after the last round export) every model of :meth:`eval_models`."""
        from feddiff.engines.evaluate import summarize

        model, samples = self.working_model(), self.run_dir.path / "samples"
        results: dict[str, dict[str, Any]] = {}
        for name, state in self.eval_models(engine).items():
            model.load_state_dict(state)
            tag = f"{prefix}-{rounds_done:04d}" + ("" if name == "global" else f"-{name}")
            results[name] = self.evaluator(model, samples, tag)
            if last:
                results[name].update(self._finalize(name, results[name], model))
        if list(results) == ["global"]:
            side = {}
            for name, state in self.strategy.side_models().items():  # e.g. edge models: evaluated, not exported
                model.load_state_dict(state)
                side[name] = self.evaluator(model, samples, f"{prefix}-{rounds_done:04d}-{name}")
            return {**results["global"], **({"side": side} if side else {})}
        first = next(iter(results.values()), {})
        shared = {k: first[k] for k in ("label", "protocol") if k in first}
        return {"models": results, **shared, **summarize(results)}

    def _finalize(self, name: str, result: dict[str, Any], model) -> dict[str, str]:
        """After the last round: samples/final*.png and the exported pipeline."""
        out = {}
        suffix = "" if name == "global" else f"-{name}"
        if "grid" in result:
            src = self.run_dir.path / result["grid"]
            dst = self.run_dir.path / "samples" / f"final{suffix}.png"
            dst.write_bytes(src.read_bytes())
            out["final_grid"] = str(dst.relative_to(self.run_dir.path))
        target = self.run_dir.model_path if name == "global" else self.run_dir.path / "models" / name
        save_pipeline(model, self.strategy.spec or self.exp.spec, self.exp.scheduler, target)
        out["model"] = str(target.relative_to(self.run_dir.path))
        return out

    def _cost_if_changed(self) -> dict[str, Any] | None:
        """Parameters and MACs of the global model, recorded at the start and whenever its shape changes."""
        sig = architecture_signature(self.strategy.global_state())
        if sig == self.arch:
            return None
        self.arch = sig
        return model_cost(self.working_model(), self.exp.channels, self.cfg.data.image_size)

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint(self, rounds_done: int, engine: Engine) -> None:
        """The whole state after ``rounds_done`` rounds: strategy, links, ledger, the engine's client records."""
        tensors, strat_meta = self.strategy.state_dict()
        tensors = {f"strategy/{k}": v for k, v in tensors.items()}
        tensors.update({f"transport/{k}": v for k, v in self.link.state_dict().items()})
        engine_tensors, clients_meta = engine.state_dict()
        tensors.update(engine_tensors)
        state = {"strategy": strat_meta, "clients": clients_meta, "ledger": self.ledger.state_dict(),
                 "elapsed_s": self.elapsed_s, "arch": self.arch, "sent_spec": self.sent_spec,
                 "info_received": self.info_received}
        self.run_dir.save_checkpoint(rounds_done, tensors, state, keep=self.cfg.run.keep_checkpoints)

    def restore(self, engine: Engine, rnd: int | None = None) -> int:
        """Load the checkpoint after round ``rnd`` (default: the newest readable one); returns its round."""
        found = load_checkpoint(self.run_dir, rnd, set_aside=rnd is None)
        rnd, tensors, state = found
        self.strategy.load_state_dict(under(tensors, "strategy/"), state["strategy"])
        engine.load_state_dict(tensors, state["clients"])
        self.ledger.load_state_dict(state["ledger"])
        self.link.load_state_dict(under(tensors, "transport/"))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.arch = state.get("arch", "")
        self.sent_spec = dict(state.get("sent_spec", {}))
        self.info_received = bool(state.get("info_received", False))
        return rnd


def reply_limit(expected: StateDict, extras: StateDict | None) -> int:
    """The most bytes a valid reply can take: twice the fp32 size of what it carries, plus 1 MiB of header.

    Without declared extras, room for as much again as the model (SCAFFOLD's controls double a reply).
    """
    model = sum(4 * v.numel() for v in expected.values())
    extra = model if extras is None else sum(4 * v.numel() for v in extras.values())
    return 2 * (model + extra) + (1 << 20)


def query_limit(model: StateDict) -> int:
    """The most bytes a query's answer can take: a personal model (twice the fp32 size of the model) or
    statistics (label counts; feature sums, 2048 x 2048 in float64 for Inception: 64 MiB leaves room)."""
    return 2 * sum(4 * v.numel() for v in model.values()) + (64 << 20)


def load_checkpoint(run_dir: RunDir, rnd: int | None, set_aside: bool) -> tuple[int, StateDict, dict[str, Any]]:
    """The checkpoint after round ``rnd``, or the newest readable one (damaged newer ones set aside)."""
    if rnd is None:
        damaged: list[tuple[Path, str]] = []
        found = run_dir.latest_checkpoint(damaged)
        if found is None:
            if not damaged:
                raise RunError(f"{run_dir.path} has no checkpoint: it stopped before its first one was saved, so "
                               f"nothing of it can be resumed. Start it again (in a new run folder) with:\n"
                               f"  feddiff run {run_dir.config_path}")
            why = "".join(f"\n  {reason}" for _, reason in damaged)
            raise RunError(f"{run_dir.path} has no readable checkpoint to resume from{why}\nStart it again "
                           f"(in a new run folder) with:\n  feddiff run {run_dir.config_path}")
        for path, reason in damaged:
            if set_aside:
                kept = run_dir.set_aside(path)
                print(f"warning: {reason}\n  kept it as {kept.name}; resuming from round {found[0]}",
                      file=sys.stderr, flush=True)
        return found
    paths = dict(run_dir.checkpoints())
    if rnd not in paths:
        raise RunError(f"{run_dir.path} has no checkpoint of round {rnd}; "
                       f"kept rounds: {sorted(paths) or 'none'} (run.keep_checkpoints)")
    return run_dir.load_checkpoint(paths[rnd])


def live_status(rec: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows after a round: loss, the metric if evaluated, training bytes so far."""
    out = {"loss": f"loss {rec['loss']:.4f}" if rec["loss"] is not None else "loss -"}
    ev = rec.get("eval", {})
    value = ev.get("fd", ev.get("fd_mean"))
    if value is not None:
        out["metric"] = f"{ev.get('label', 'FD')} {value:.2f} (round {rec['round']})"
    sent = sum(training_bytes(rec.get("bytes_cumulative", {})).values())
    out["sent"] = f"sent {_fmt_bytes(sent)}"
    return out


def round_line(rec: dict[str, Any], num_rounds: int) -> str:
    """The one line a round prints (bytes of the client links: client-server or client-edge)."""
    client_links = [v for k, v in rec["bytes"].items() if k.startswith("client-")]
    b = {d: sum(v[d] for v in client_links) for d in ("down", "up")}
    loss = f"{rec['loss']:.4f}" if rec["loss"] is not None else "-"
    line = (f"round {rec['round']:>3}/{num_rounds}  loss {loss}  clients {len(rec['clients'])}  "
            f"down {_fmt_bytes(b['down'])}  up {_fmt_bytes(b['up'])}  {rec['time_s']['round']:.1f}s")
    cloud = rec["bytes"].get("edge-cloud")
    if cloud:
        line += f"  edge-cloud {_fmt_bytes(cloud['up'] + cloud['down'])}"
    line += f"  {live_status(rec)['sent']} so far"
    if rec.get("rejected"):
        line += f"  rejected {len(rec['rejected'])}"
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


__all__ = ["EVAL_LINK", "LINK", "Engine", "Incoming", "Outgoing", "RoundEvents", "RoundResult", "Server",
           "live_status", "load_checkpoint", "round_line"]
