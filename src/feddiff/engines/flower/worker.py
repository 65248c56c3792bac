"""A node's warm worker: the heavy half of the ClientApp, kept alive between Flower's messages.

Flower 1.42 starts a new ClientApp process for every message. Ours then imports torch and diffusers
(3.3-3.5 s here) and rebuilds the client (model, partition) before it trains. A worker is one long-lived
process per node, started beside its SuperNode (``python -m feddiff.engines.flower.worker --socket PATH``;
``feddiff flower`` starts one per node), that keeps the imports, the partition and the client's objects
between messages. A ClientApp whose node config names it (``worker="PATH"``) imports only Flower and
feddiff's config, hands the message and the node's record to the worker over a Unix socket, and returns
the worker's answer.

What a run depends on stays where it was: the client's record lives in Flower's ``Context.state`` and
travels to the worker and back with every message, and the worker answers exactly as the ClientApp
would (the same :class:`~feddiff.engines.flower.node.NodeSession`). It keeps only caches, so a worker
that restarts, or is not there (the ClientApp then handles the message itself, and says so in the
node's log), changes no result.

The socket is the node owner's: created in a private directory (mode 0700) with mode 0600, so only
that user's processes reach it. On it, each direction carries a JSON header and then two payloads (the
message and the record; an error's are empty), each as an 8-byte length and the bytes; the lengths are
capped and nothing is unpickled.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import socket
import stat
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

MAX_HEADER = 1 << 20  # a request's or answer's JSON header
MAX_PAYLOAD = 16 << 30  # a message or record: far above any model here, below a length that means garbage
SESSIONS = 4  # clients (runs x partitions) a worker keeps warm at once


class WorkerUnavailable(ConnectionError):
    """No worker answers on the socket (not started, stopped, or another program): handle the message here."""


class WorkerError(RuntimeError):
    """The worker handled the message and failed; the text is its error, with its type."""


def _send(sock: socket.socket, header: dict[str, Any], payloads: list[bytes]) -> None:
    head = json.dumps(header).encode()
    sock.sendall(len(head).to_bytes(8, "little") + head)
    for p in payloads:
        sock.sendall(len(p).to_bytes(8, "little"))
        sock.sendall(p)


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"the other end closed the socket after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _receive(sock: socket.socket, payloads: int) -> tuple[dict[str, Any], list[bytes]]:
    n = int.from_bytes(_exact(sock, 8), "little")
    if n > MAX_HEADER:
        raise ConnectionError(f"a header of {n} bytes (at most {MAX_HEADER}): not a feddiff worker exchange")
    header = json.loads(_exact(sock, n))
    if not isinstance(header, dict):
        raise ConnectionError("the header is not a JSON object")
    out = []
    for _ in range(payloads):
        n = int.from_bytes(_exact(sock, 8), "little")
        if n > MAX_PAYLOAD:
            raise ConnectionError(f"a payload of {n} bytes (at most {MAX_PAYLOAD})")
        out.append(_exact(sock, n))
    return header, out


# ----------------------------------------------------------------------------------------------
# The ClientApp's side


def call(path: str, app_file: str, node_config: dict[str, Any], blob: bytes, record: bytes | None,
         ) -> tuple[bytes, bytes]:
    """(reply, the record's new bytes) of one feddiff message, from the worker on ``path``.

    Raises :class:`WorkerUnavailable` if no worker takes the message (nothing was handled), and
    :class:`WorkerError` (or ``ConfigError`` for a config the worker refuses) if it failed handling it.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as err:
            raise WorkerUnavailable(f"no worker on {path}: {err}") from None
        config = {k: v for k, v in node_config.items() if isinstance(v, (str, int, float, bool))}
        _send(sock, {"app_file": str(app_file), "node_config": config, "has_record": record is not None},
              [bytes(blob), bytes(record or b"")])
        header, payloads = _receive(sock, 2)
    finally:
        sock.close()
    if header.get("ok") is True:
        return payloads[0], payloads[1]
    kind, text = str(header.get("type", "Error")), str(header.get("error", "(no message)"))
    if kind == "ConfigError":
        from feddiff.config import ConfigError

        raise ConfigError(text)
    raise WorkerError(f"the node's worker failed: {kind}: {text}")


# ----------------------------------------------------------------------------------------------
# The worker's side


class Slots:
    """At most ``n`` messages handled at once among the workers that share ``folder`` (the nodes of one
    machine): ``n`` lock files, one held per message. Nodes that share a machine otherwise train side by
    side on fewer cores than there are nodes, each slower than alone."""

    def __init__(self, folder: Path, n: int):
        if n < 1:
            raise ValueError(f"slots must be at least 1, got {n}")
        self.paths = [Path(folder) / f"slot-{i}.lock" for i in range(n)]

    @contextmanager
    def held(self) -> Iterator[None]:
        while True:
            for path in self.paths:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield
                    return
                finally:
                    os.close(fd)  # (releases the lock)
            time.sleep(0.02)


class Worker:
    """Answers feddiff messages on a Unix socket, one at a time, with a few clients kept warm."""

    def __init__(self, path: str | Path, slots: int | None = None):
        self.path = Path(path)
        self.sessions: OrderedDict[tuple, Any] = OrderedDict()
        self.sock = _listen(self.path)
        self.slots = Slots(self.path.parent, slots) if slots else None

    def session(self, app_file: str, node_config: dict[str, Any]):
        from feddiff.engines.flower.apps import read_app_file
        from feddiff.engines.flower.node import NodeSession, node_identity

        identity = node_identity(node_config)
        st = os.stat(app_file)  # a new app file (another run, or the same path rewritten) is a new client
        key = (os.path.realpath(app_file), st.st_mtime_ns, st.st_size, identity)
        if key not in self.sessions:
            cfg, _ = read_app_file(app_file)
            self.sessions[key] = NodeSession(cfg, identity)
            while len(self.sessions) > SESSIONS:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(key)
        return self.sessions[key]

    def answer(self, conn: socket.socket) -> None:
        header, (blob, record) = _receive(conn, 2)
        try:
            session = self.session(str(header["app_file"]), dict(header["node_config"]))
            with self.slots.held() if self.slots else nullcontext():
                reply, new_record = session.handle(blob, record if header.get("has_record") else None)
        except Exception as err:  # noqa: BLE001 - the ClientApp raises it again, with its type and text
            print(f"feddiff worker: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            traceback.print_exc()
            _send(conn, {"ok": False, "type": type(err).__name__, "error": str(err)}, [b"", b""])
            return
        _send(conn, {"ok": True}, [reply, new_record])

    def serve(self, idle_exit_s: float | None = None, stop: threading.Event | None = None) -> None:
        """Answer connections until killed (SIGTERM), ``stop`` is set, or ``idle_exit_s`` pass without one."""
        self.sock.settimeout(0.1 if stop is not None else idle_exit_s)
        last = time.monotonic()
        try:
            while stop is None or not stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    if idle_exit_s is not None and time.monotonic() - last >= idle_exit_s:
                        return
                    continue
                last = time.monotonic()
                with conn:
                    conn.settimeout(None)
                    start = time.perf_counter()
                    try:
                        self.answer(conn)
                    except (ConnectionError, OSError, ValueError) as err:  # a ClientApp that went away, or junk
                        print(f"feddiff worker: dropped a connection: {err}", file=sys.stderr, flush=True)
                    print(f"feddiff worker: answered in {time.perf_counter() - start:.2f} s", flush=True)
        finally:
            self.close()

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _listen(path: Path) -> socket.socket:
    """A listening socket at ``path`` that only this user can reach; refuses a path another worker serves."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(parent.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{parent} is open to other users (mode {mode:o}); a worker's socket needs a "
                              "directory only its user can enter (chmod 700)")
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a socket left by a worker that died
        else:
            raise RuntimeError(f"another worker serves {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A feddiff node's warm worker (beside its Flower SuperNode)")
    parser.add_argument("--socket", required=True, help="Unix socket path, in a directory only this user can enter; "
                        "give the SuperNode --node-config '... worker=\"PATH\"'")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="S", help="exit after S seconds idle")
    parser.add_argument("--slots", type=int, default=None, metavar="N",
                        help="nodes sharing one machine: at most N of the workers whose sockets share this one's "
                             "directory handle a message at once (e.g. cores / torch threads per node)")
    args = parser.parse_args(argv)
    worker = Worker(args.socket, args.slots)  # listening before the heavy imports: a ClientApp early in the queue just waits
    print(f"feddiff worker: listening on {args.socket}", flush=True)
    for module in ("feddiff.client.node", "feddiff.client.runtime", "feddiff.engines.experiment"):
        importlib.import_module(module)  # then torch, diffusers and the client's code, once

    worker.serve(args.idle_exit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
