"""The ServerApp and ClientApp of a feddiff run on Flower, built from a resolved config file.

A generated app folder (``local.write_app``) holds two three-line modules that call
:func:`make_server_app` and :func:`make_client_app` with the path of ``feddiff_run.json`` (the resolved
config and where the run folder goes), which Flower ships to every node inside the app bundle. The apps
import the installed feddiff: nothing of feddiff is copied into the bundle.

The ServerApp learns which node holds which partition (and edge) with a ``query.hello`` round, then runs
the same round loop as the simulator. Each ClientApp call rebuilds its client from the config, loads its
partition from the node's cache, and keeps its record in ``Context.state``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

# light imports only: a ClientApp process imports this module for every message, and a hello needs no torch
# (but a node with its own data: it reads the data to declare its size)
from feddiff.config import Config, ConfigError, config_from_dict
from feddiff.engines.flower.node import (EDGE_ID, NUM_PARTITIONS, OWN_DATA, PARTITION_ID, WORKER, NodeSession,
                                         node_identity, own_data_summary)
from feddiff.engines.flower.protocol import DONE_FILE, SECTION, STATE


def read_app_file(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, the rest of the app file: run_path, poll_s, timeout_s)."""
    data = json.loads(Path(path).read_text())
    cfg = config_from_dict(data["config"], str(path))
    return cfg, {k: v for k, v in data.items() if k != "config"}


def check_flower_config(cfg: Config) -> None:
    """Settings the Flower engine cannot honour (yet), refused before anything runs."""
    if cfg.train.optimizer_scope == "shared":
        raise ConfigError('train.optimizer_scope = "shared" is a simulator artefact (one optimizer for every '
                          "client); on Flower each client keeps its own")
    if cfg.eval.federated_reference:
        raise ConfigError("eval.federated_reference is not available on the Flower engine yet; use reference "
                          "statistics from the server's reference split")
    if cfg.personalize.steps:
        raise ConfigError("personalize.steps > 0 on Flower: the fine-tuning phase needs every client's data in "
                          "one process (the simulator); on a real federation each site fine-tunes its own copy")
    if cfg.audit.enabled:
        raise ConfigError("audit.enabled on Flower: the audit reads the clients' images, which the server does not "
                          "hold; run `feddiff audit RUN_DIR` where the data is")


def with_node_edges(cfg: Config, found: dict[int, dict[str, Any]]) -> Config:
    """A hierarchy whose nodes declare their edge (``edge-id``): fixed edges, in the nodes' order."""
    declared = {pid: f["edge"] for pid, f in found.items() if f["edge"]}
    if not declared:
        return cfg
    if not hasattr(cfg.algorithm, "num_edges"):
        print(f"note: nodes declare edges, but {cfg.algorithm.name!r} is not a hierarchy; ignored", flush=True)
        return cfg
    if len(declared) != len(found):
        raise ConfigError(f"only partitions {sorted(declared)} declare an {EDGE_ID}; give every node one or none")
    names = sorted(set(declared.values()))
    if len(names) != cfg.algorithm.num_edges:
        raise ConfigError(f"the nodes declare {len(names)} edges {names}; algorithm.num_edges = "
                          f"{cfg.algorithm.num_edges}")
    edge_of = [names.index(declared[pid]) for pid in range(len(found))]
    print(f"edges from the nodes' {EDGE_ID}: " + ", ".join(f"{n} = clients {[p for p in range(len(found)) if edge_of[p] == i]}"
                                                          for i, n in enumerate(names)), flush=True)
    algo = cfg.algorithm.model_copy(update={"selection": "fixed", "edge_of": edge_of})
    return cfg.model_copy(update={"algorithm": algo})


def server_main(grid: Grid, app_file: Path) -> str:
    """Run the rounds on the nodes behind ``grid``; returns the run folder."""
    from feddiff.engines.experiment import build_experiment
    from feddiff.engines.flower.grid import FlowerEngine, discover
    from feddiff.engines.simulator import Simulator
    from feddiff.runs import RunDir

    cfg, extra = read_app_file(app_file)
    check_flower_config(cfg)
    found = discover(grid, cfg.partition.num_clients)
    cfg = with_node_edges(cfg, found)
    declared = declared_data(found)
    if declared is not None and not extra.get("own_data"):
        raise ConfigError("the nodes hold their own data (own-data=true), but this run was not written for that: "
                          "their declared sizes would replace the partition's as aggregation weights. Write the app "
                          "with own_data=True (feddiff flower --own-data ...), or start the nodes without own-data")
    if declared is None and extra.get("own_data"):
        raise ConfigError("this run was written for nodes with their own data, but the nodes cut a shared dataset "
                          "(no own-data=true in their node config)")
    if declared is not None:
        print(f"the nodes hold their own data: {len(declared.sizes)} clients of {min(declared.sizes)}.."
              f"{max(declared.sizes)} images (declared sizes: the aggregation weights), {declared.channels} "
              f"channel(s), {len(declared.classes)} classes", flush=True)
    # nodes that cut a shared dataset: the server reads its train split for the partition sizes (the aggregation
    # weights); nodes with their own data: their declared sizes, and the server reads no training image
    exp = build_experiment(cfg, declared)
    run_path = extra.get("run_path")
    run_dir = RunDir.create_at(run_path) if run_path else RunDir.create(cfg.run.out_dir, cfg.run.name or "run")
    # --round-timeout, else faults.deadline_s: a node's reply later than that is its failure (the message expires)
    timeout_s = extra.get("round_timeout_s") or cfg.faults.deadline_s or None
    engine = FlowerEngine(grid, {pid: f["node"] for pid, f in found.items()}, poll_s=float(extra.get("poll_s", 0.05)),
                          timeout_s=timeout_s)
    sim = Simulator(exp, run_dir, engine=engine)
    sim.initialize()
    sim.run()
    run_dir.write_json(DONE_FILE, {"status": "completed", "rounds": cfg.run.num_rounds})  # what run_local checks
    return str(run_dir.path)


def make_server_app(app_file: str | Path) -> ServerApp:
    """The ServerApp of the run described by ``app_file``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_main(grid, Path(app_file))

    return app


def declared_data(found: dict[int, dict[str, Any]]):
    """The nodes' own data as they declared it (:class:`~feddiff.engines.experiment.DeclaredData`), or None
    when they cut a shared dataset. Every node or none must hold its own data."""
    from feddiff.engines.experiment import DeclaredData

    own = sorted(pid for pid, f in found.items() if f.get("own"))
    if not own:
        return None
    if len(own) != len(found):
        raise ConfigError(f"partitions {own} hold their own data ({OWN_DATA}=true) and "
                          f"{sorted(set(found) - set(own))} cut a shared dataset; all nodes must do the same")
    for key in ("channels", "classes"):  # (class names in label order: label k must mean one class everywhere)
        values = {pid: found[pid][key] for pid in own}
        if len(set(values.values())) > 1:
            raise ConfigError(f"the nodes' own data disagree on {key}: {str(values)[:400]}")
    first = found[own[0]]
    return DeclaredData(tuple(found[pid]["size"] for pid in own), first["channels"], first["classes"])


def hello_answer(node_config: dict[str, Any], app_file: str | Path | None = None) -> RecordDict:
    """A node's answer to ``query.hello``: the partition it holds and its edge (from its node config); a node
    with its own data also says how many training images it holds, their channels and classes (it reads them
    for that, with the run's data settings from ``app_file``)."""
    me = node_identity(node_config)
    answer: dict[str, Any] = {PARTITION_ID: me.partition_id, NUM_PARTITIONS: me.num_partitions, EDGE_ID: me.edge_id,
                              OWN_DATA: me.own_data}
    if me.own_data:
        if app_file is None:
            raise ConfigError(f"{OWN_DATA}=true: this hello cannot read the node's data without the run's app file")
        cfg, _ = read_app_file(app_file)
        answer.update(own_data_summary(cfg, me))
    return RecordDict({SECTION: ConfigRecord(answer)})


def client_answer(content: RecordDict, node_config: dict[str, Any], state: RecordDict, app_file: str | Path) -> RecordDict:
    """A node's answer to a feddiff task or query; its record in ``state`` is replaced only on success."""
    node_identity(node_config)  # a node config that names no partition fails here, before anything is sent
    kept = state[STATE] if STATE in state else None
    before = kept["record"] if kept is not None else None
    rnd = int(content[SECTION]["round"])
    reply, record = handle_message(app_file, node_config, content[SECTION]["blob"], before)
    # the record from before this round is kept until the next round: a round that does not count
    # (faults policy) brings the node back to it (ROLLBACK); a second message of the same round (a retry)
    # keeps the one from before the round, not the one after its first attempt
    if kept is not None and (int(kept["round"]) == rnd or rnd < 0):  # a retry, or a query (not a round)
        previous, had_previous, rnd = kept["previous"], bool(kept["had_previous"]), int(kept["round"])
    else:
        previous, had_previous = (before if before is not None else b""), before is not None
    state[STATE] = ConfigRecord({"record": record, "previous": previous, "had_previous": had_previous, "round": rnd})
    return RecordDict({SECTION: ConfigRecord({"blob": reply})})


def handle_message(app_file: str | Path, node_config: dict[str, Any], blob: bytes,
                   record: bytes | None) -> tuple[bytes, bytes]:
    """(reply, the record's new bytes): by the node's warm worker if its config names one and it answers
    (``worker.py``), else here, which imports torch and rebuilds the client for this one message."""
    path = node_config.get(WORKER)
    if path:
        from feddiff.engines.flower import worker

        try:
            return worker.call(str(path), str(app_file), node_config, blob, record)
        except (worker.WorkerUnavailable, worker.WorkerError) as err:
            print(f"feddiff: the node's worker: {err}; this ClientApp handles the message itself", file=sys.stderr,
                  flush=True)
    cfg, _ = read_app_file(app_file)
    return NodeSession(cfg, node_identity(node_config)).handle(blob, record)


def rollback_answer(content: RecordDict, state: RecordDict) -> RecordDict:
    """Restore the record from before round ``content.round``'s message, if that was the node's last one."""
    rnd = int(content[SECTION]["round"])
    kept = state[STATE] if STATE in state else None
    if kept is None or int(kept["round"]) != rnd:
        return RecordDict({SECTION: ConfigRecord({"restored": False})})
    if kept["had_previous"]:
        state[STATE] = ConfigRecord({"record": kept["previous"], "previous": b"", "had_previous": False, "round": -2})
    else:
        del state[STATE]
    return RecordDict({SECTION: ConfigRecord({"restored": True})})


def make_client_app(app_file: str | Path) -> ClientApp:
    """The ClientApp of the run described by ``app_file``."""
    app = ClientApp()

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        return Message(hello_answer(context.node_config, app_file), reply_to=msg)

    def handle(msg: Message, context: Context) -> Message:
        return Message(client_answer(msg.content, context.node_config, context.state, app_file), reply_to=msg)

    app.train("feddiff")(handle)
    app.query("feddiff")(handle)

    @app.query("rollback")
    def rollback(msg: Message, context: Context) -> Message:
        return Message(rollback_answer(msg.content, context.state), reply_to=msg)

    return app
