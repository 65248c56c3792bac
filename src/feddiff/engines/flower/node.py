"""A Flower node's side of feddiff, without Flower: its config, its data, its record, one message at a time.

Flower starts a fresh ClientApp process for every message, so what a node needs is rebuilt each time and
kept small: the config (shipped inside the app), the client's partition (read once from the dataset and
cached on the node's disk, keyed by everything that defines it), and the client's record (optimizer state,
personal model, control variates, link copies), which travels in and out of Flower's ``Context.state`` as
one feddiff frame (CRC-checked, nothing unpickled).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from feddiff.config import Config, ConfigError

if TYPE_CHECKING:  # torch is imported where a message needs it (a hello does not)
    import torch

# node config keys (flower-supernode --node-config 'partition-id=0 num-partitions=4 edge-id="e1"')
PARTITION_ID, NUM_PARTITIONS, EDGE_ID, DATA_ROOT = "partition-id", "num-partitions", "edge-id", "data-root"
OWN_DATA = "own-data"  # true: data-root holds this node's own images (its whole train split), not a shared dataset
WORKER = "worker"  # the Unix socket of the node's warm worker (worker.py), if it has one


@dataclass(frozen=True)
class NodeIdentity:
    """Who a node says it is: the partition it holds, and the edge it belongs to (hierarchies).

    ``own_data``: the node trains on all of the train split under ``data_root``, its own images, instead of
    cutting partition ``partition_id`` out of a copy of the whole dataset (then ``partition_id`` only says
    which client it is)."""

    partition_id: int
    num_partitions: int
    edge_id: str = ""
    data_root: str = ""
    own_data: bool = False


def node_identity(node_config: dict[str, Any]) -> NodeIdentity:
    """Read a node's config; a missing or wrong key is an error naming it and the flag that sets it."""
    def need(key: str, kind: type):
        if key not in node_config:
            raise ConfigError(f"this SuperNode has no {key!r} in its node config; start it with "
                              f"--node-config '{PARTITION_ID}=K {NUM_PARTITIONS}=N' (got {dict(node_config)})")
        value = node_config[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"node config {key!r} must be a {kind.__name__}, got {value!r}")
        return value

    pid, num = need(PARTITION_ID, int), need(NUM_PARTITIONS, int)
    if not 0 <= pid < num:
        raise ConfigError(f"node config {PARTITION_ID}={pid} is not in 0..{num - 1} ({NUM_PARTITIONS}={num})")
    edge, root, own = node_config.get(EDGE_ID, ""), node_config.get(DATA_ROOT, ""), node_config.get(OWN_DATA, False)
    if not all(isinstance(node_config.get(k, ""), str) for k in (EDGE_ID, DATA_ROOT, WORKER)):
        raise ConfigError(f"node config {EDGE_ID!r}, {DATA_ROOT!r} and {WORKER!r} must be quoted strings, "
                          f"e.g. {EDGE_ID}=\"e1\"")
    if not isinstance(own, bool):
        raise ConfigError(f"node config {OWN_DATA!r} must be true or false, got {own!r}")
    if own and not root:
        raise ConfigError(f"node config {OWN_DATA}=true needs {DATA_ROOT}=\"...\": the folder of this node's own "
                          "images (the config's data.dataset format)")
    return NodeIdentity(pid, num, edge, root, own)


def encode_record(state) -> bytes:
    """A :class:`~feddiff.client.runtime.ClientState` as one feddiff frame (what ``Context.state`` holds)."""
    from feddiff.compress import wire

    tensors, meta = state.to_flat()
    return wire.encode(wire.Message(tensors, meta))


def decode_record(blob: bytes | None):
    """Read back :func:`encode_record`'s bytes (None: a node that has not trained yet)."""
    from feddiff.client.runtime import ClientState
    from feddiff.compress import wire

    if not blob:
        return ClientState()
    msg = wire.decode(bytes(blob))
    return ClientState.from_flat(msg.tensors, msg.meta)


def partition_key(cfg: Config, pid: int, own: bool = False) -> str:
    """What defines a client's data: dataset, size, subset, partition and the seeds they derive from (a node's
    own data: the dataset's settings, its folder among them), and the data folder as it is now
    (:func:`files_of`: a file added, removed or replaced at its top is read again)."""
    what = {"data": cfg.data.model_dump(mode="json"), "own": True} if own else \
        {"data": cfg.data.model_dump(mode="json"), "partition": cfg.partition.model_dump(mode="json"),
         "seed": cfg.run.seed, "client": pid}
    what["files"] = files_of(data_folder(cfg))
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def data_folder(cfg: Config) -> str:
    """The folder the node's data is read from (``data.root``, else the dataset reader's default)."""
    from feddiff.data.sources import data_root

    return data_root(cfg.data.dataset, cfg.data.root)


def files_of(root: str) -> list[tuple[str, int, int]]:
    """What the data folder holds, cheaply: (name, size, modification time in ns) of each file at its top,
    and (name/, number of entries, modification time) of each folder there (CelebA keeps 200k images in
    one: listing a folder costs little, a stat of each image 3 s). A file replaced in place inside a
    folder goes unnoticed. The node's own cache is left out when it is kept under the data folder."""
    if not root or not os.path.isdir(root):
        return []
    cache = os.path.realpath(cache_dir())
    out = []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = os.path.realpath(entry.path)
            if cache == path or cache.startswith(path + os.sep):
                continue
            try:
                st = entry.stat()  # (follows links: a linked class folder is what is read)
                if entry.is_dir():
                    with os.scandir(entry.path) as inner:
                        out.append((entry.name + "/", sum(1 for _ in inner), st.st_mtime_ns))
                else:
                    out.append((entry.name, st.st_size, st.st_mtime_ns))
            except OSError:
                continue
    return out


def cache_dir() -> Path:
    """Where a node keeps its partition between messages (``FEDDIFF_CACHE``, else ~/.cache/feddiff)."""
    return Path(os.environ.get("FEDDIFF_CACHE") or Path.home() / ".cache" / "feddiff") / "flower-partitions"


def load_partition(cfg: Config, pid: int, own: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images, labels, class names) of client ``pid``: from the node's cache, else read and cut.

    The cut is the simulator's (``partition_train`` of the whole train split), so a Flower client trains on
    exactly the images the simulator's client ``pid`` does. ``own``: the whole train split under
    ``data.root``, the node's own images, in the order they are stored.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from feddiff.engines.experiment import load_split, partition_train

    path = cache_dir() / f"{partition_key(cfg, pid, own)}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), "pt") as fh:
                classes = json.loads(fh.metadata()["class_names"])
                if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
                    raise ValueError("class names")
                return fh.get_tensor("images"), fh.get_tensor("labels"), classes
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    train = load_split(cfg, "train")
    if own:
        if not len(train):
            raise ConfigError(f"this node's own data under {cfg.data.root!r} holds no training images")
        images, labels = train.images, train.labels
    else:
        _, parts = partition_train(cfg, train.labels.numpy())
        if len(parts) != cfg.partition.num_clients or not 0 <= pid < len(parts):
            raise ConfigError(f"partition {pid} does not exist: the config cuts {len(parts)} partitions")
        idx = torch.from_numpy(parts[pid])
        images, labels = train.images[idx].contiguous(), train.labels[idx].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"images": images, "labels": labels}, str(tmp), {"class_names": json.dumps(train.class_names)})
    os.replace(tmp, path)
    return images, labels, list(train.class_names)


def node_data_config(cfg: Config, identity: NodeIdentity) -> Config:
    """The run's config with the node's ``data-root`` (its copy of the dataset, or its own data) as data.root."""
    if not identity.data_root:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": identity.data_root})})


def own_data_summary(cfg: Config, identity: NodeIdentity) -> dict[str, Any]:
    """What a node with its own data tells the server in its hello: how many training images it holds (the
    aggregation weight: a claim the server cannot check), their channels and the class names (in label order:
    every node's must be the same)."""
    images, _, classes = load_partition(node_data_config(cfg, identity), identity.partition_id, True)
    return {"num-examples": int(images.shape[0]), "channels": int(images.shape[1]), "class-names": list(classes)}


class NodeSession:
    """One message on one node: the client half of the run built from the config, for partition ``pid``."""

    def __init__(self, cfg: Config, identity: NodeIdentity):
        import torch

        from feddiff.algorithms import client_hook
        from feddiff.client.node import ClientData, ClientNode
        from feddiff.client.runtime import ClientRuntime
        from feddiff.compress.link import ClientLink
        from feddiff.client.train import train_spec
        from feddiff.engines.experiment import ModelCache, link_specs, model_spec, pick_device
        from feddiff.model.diffusion import make_scheduler
        from feddiff.seeding import derive_seed

        if identity.num_partitions != cfg.partition.num_clients:
            raise ConfigError(f"this node says {NUM_PARTITIONS}={identity.num_partitions} but the run has "
                              f"partition.num_clients={cfg.partition.num_clients}")
        cfg = node_data_config(cfg, identity)
        self.cfg, self.identity = cfg, identity
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        device = pick_device(cfg.run.device, cfg.run.deterministic)
        images, labels, classes = load_partition(cfg, identity.partition_id, identity.own_data)
        self.data = ClientData(images.to(device), labels, len(classes))
        d, t = cfg.diffusion, cfg.train
        spec = model_spec(cfg, int(images.shape[1]))
        runtime = ClientRuntime(ModelCache(device, derive_seed(cfg.run.seed, "model-init")), spec,
                                make_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end),
                                train_spec(cfg), cfg.run.seed, client_hook(cfg), t.keep_optimizer_state,
                                t.lr_schedule_rounds or cfg.run.num_rounds, t.lr_schedule, t.min_lr_ratio)
        self.node = ClientNode(runtime, ClientLink(link_specs(cfg), cfg.run.seed))

    def handle(self, blob: bytes, record: bytes | None) -> tuple[bytes, bytes]:
        """Answer one feddiff message; returns (reply bytes, the record's new bytes)."""
        state = decode_record(record)
        reply = self.node.handle(self.identity.partition_id, bytes(blob), state, self.data)
        return reply, encode_record(state)

