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
would (the same :class:`~feddiff.engines.flower.node.NodeSession`, under the ClientApp's working folder,
partition cache and the run's torch threads, and only for the same feddiff and torch versions). It keeps
only caches, so no result depends on it: when the worker is not there, belongs to another user, is busy
past ``ACCEPT_S``, goes away midway or fails, the ClientApp handles the message itself (and says so in
the node's log); a failure is then reported as the ClientApp's own. A worker that hangs while training
holds its ClientApp until the round's deadline, as a hanging ClientApp would.

The socket is the node owner's: created in a private directory (mode 0700) with mode 0600, so only
that user's processes reach it. On it, each direction carries a JSON header and then two payloads (the
message and the record; an error's are empty), each as an 8-byte length and the bytes; the lengths are
capped and nothing is unpickled.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import importlib
import json
import os
import socket
import stat
import struct
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
MAX_PAYLOAD = 8 << 30  # a message or record: far above any model here, below a length that means garbage
SESSIONS = 4  # clients (runs x partitions) a worker keeps warm at once
ACCEPT_S = 10.0  # a worker that has not taken a message within this (busy with another) leaves it to the ClientApp
REQUEST_S = 60.0  # a request or answer that does not arrive within this is dropped
CHUNK = 8 << 20  # payloads are read in pieces: memory grows with what arrives, not with a claimed length


class WorkerUnavailable(ConnectionError):
    """No worker took the message to the end (none there, busy, another user's, gone midway): handle it here."""


class WorkerError(RuntimeError):
    """The worker handled the message and failed; the text is its error, with its type. The ClientApp
    handles the message itself then, so that the error it reports is the one it would have had anyway."""


def _send(sock: socket.socket, header: dict[str, Any], payloads: list[bytes]) -> None:
    """A JSON header and length-prefixed payloads. Nothing is sent after the last byte the other end
    reads: a zero-length send after it could meet a socket the other end, done, had already closed
    (EPIPE: a ClientApp with no record to send took a worker's quick answer for a lost worker)."""
    head = json.dumps(header).encode()
    sock.sendall(len(head).to_bytes(8, "little") + head)
    for p in payloads:
        sock.sendall(len(p).to_bytes(8, "little"))
        if len(p):
            sock.sendall(p)


def _exact(sock: socket.socket, n: int) -> bytes:
    pieces, got = [], 0
    while got < n:
        piece = sock.recv(min(CHUNK, n - got))
        if not piece:
            raise ConnectionError(f"the other end closed the socket after {got} of {n} bytes")
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (None where the system cannot say)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _versions() -> dict[str, str]:
    """feddiff's and torch's versions, read without importing torch (the ClientApp does not)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("feddiff", "torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = ""
    return out


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

    Raises :class:`WorkerUnavailable` if no worker took the message to the end: none listens, the one that
    does belongs to another user, it has not taken the message within ``ACCEPT_S`` (busy), or it went
    away midway; and :class:`WorkerError` if it handled the message and failed. Either way the caller
    can handle the message itself: the worker keeps nothing the record depends on.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as err:
            raise WorkerUnavailable(f"no worker on {path}: {err}") from None
        uid = _peer_uid(sock)
        if uid is not None and uid != os.geteuid():
            raise WorkerUnavailable(f"the process on {path} runs as user {uid}, not as this node's user {os.geteuid()}")
        config = {k: v for k, v in node_config.items() if isinstance(v, (str, int, float, bool))}
        request = {"app_file": os.path.abspath(app_file), "node_config": config, "has_record": record is not None,
                   "versions": _versions(), "cwd": os.getcwd(), "cache": os.environ.get("FEDDIFF_CACHE")}
        try:
            sock.settimeout(REQUEST_S)
            _send(sock, request, [bytes(blob), bytes(record or b"")])
            sock.settimeout(ACCEPT_S)
            taken, _ = _receive(sock, 0)
            if taken.get("taken") is not True:
                raise WorkerUnavailable(f"the worker on {path} did not take the message: {taken}")
            sock.settimeout(None)  # the training: as long as it takes (a round's deadline is the server's)
            header, payloads = _receive(sock, 2)
        except (TimeoutError, ConnectionError, OSError, ValueError) as err:
            raise WorkerUnavailable(f"the worker on {path} did not answer: {type(err).__name__}: {err}") from None
    finally:
        sock.close()
    if header.get("ok") is True:
        return payloads[0], payloads[1]
    raise WorkerError(f"{header.get('type', 'Error')}: {header.get('error', '(no message)')}")


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

    def __init__(self, path: str | Path, slots: int | None = None, parent_pid: int | None = None):
        self.path = Path(path)
        self.sessions: OrderedDict[tuple, Any] = OrderedDict()
        self.sock = _listen(self.path)
        self.slots = Slots(self.path.parent, slots) if slots else None
        self.parent_pid = parent_pid
        self.threads: int | None = None  # torch's thread count when serving starts

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

    def answer(self, conn: socket.socket) -> bool:
        """Take one message from ``conn`` and answer it; True if it was handled without error."""
        uid = _peer_uid(conn)
        if uid is not None and uid != os.geteuid():
            raise ConnectionError(f"a process of user {uid} connected; this worker serves user {os.geteuid()}")
        conn.settimeout(REQUEST_S)
        header, (blob, record) = _receive(conn, 2)
        _send(conn, {"taken": True}, [])
        try:
            mine = self.versions()
            if header.get("versions") != mine:
                raise RuntimeError(f"the ClientApp runs {header.get('versions')}, this worker {mine}; restart it")
            self.settle(header)
            session = self.session(str(header["app_file"]), dict(header["node_config"]))
            self.settle(header, session)
            with self.slots.held() if self.slots else nullcontext():
                reply, new_record = session.handle(blob, record if header.get("has_record") else None)
        except Exception as err:  # noqa: BLE001 - the ClientApp handles the message itself then
            print(f"feddiff worker: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            traceback.print_exc()
            _send(conn, {"ok": False, "type": type(err).__name__, "error": str(err)}, [b"", b""])
            return False
        _send(conn, {"ok": True}, [reply, new_record])
        return True

    @functools.cache  # noqa: B019 - one worker per process
    def versions(self) -> dict[str, str]:
        """What this process runs: feddiff's installed version when it started, and the torch it imported."""
        import torch

        return {**_versions(), "torch": torch.__version__}

    def settle(self, header: dict[str, Any], session: Any = None) -> None:
        """The process-wide settings a ClientApp of this message would have: its working folder and
        partition cache (relative data paths, cached partitions), then the session's torch threads."""
        cwd, cache = header.get("cwd"), header.get("cache")
        if isinstance(cwd, str) and os.path.isdir(cwd):
            os.chdir(cwd)
        if isinstance(cache, str):
            os.environ["FEDDIFF_CACHE"] = cache
        else:
            os.environ.pop("FEDDIFF_CACHE", None)
        if session is not None:
            import torch

            from feddiff.engines.experiment import pick_device

            torch.set_num_threads(session.cfg.run.num_threads or self.threads or torch.get_num_threads())
            pick_device(session.cfg.run.device, session.cfg.run.deterministic)

    def serve(self, idle_exit_s: float | None = None, stop: threading.Event | None = None) -> None:
        """Answer connections until killed (SIGTERM), ``stop`` is set, ``idle_exit_s`` pass without one, or
        the process that started this one (``parent_pid``) is gone."""
        import torch

        self.threads = self.threads or torch.get_num_threads()  # what a run that sets none gets, as a ClientApp would
        self.sock.settimeout(0.1 if stop is not None else 1.0)
        last = time.monotonic()
        try:
            while stop is None or not stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    if idle_exit_s is not None and time.monotonic() - last >= idle_exit_s:
                        return
                    if self.parent_pid is not None and not _alive(self.parent_pid):
                        print(f"feddiff worker: process {self.parent_pid} is gone; stopping", flush=True)
                        return
                    continue
                last = time.monotonic()
                with conn:
                    start = time.perf_counter()
                    try:
                        ok = self.answer(conn)
                    except (ConnectionError, OSError, ValueError, MemoryError) as err:  # gone, or junk
                        print(f"feddiff worker: dropped a connection: {type(err).__name__}: {err}", file=sys.stderr,
                              flush=True)
                        continue
                    print(f"feddiff worker: {'answered' if ok else 'failed'} in {time.perf_counter() - start:.2f} s",
                          flush=True)
        finally:
            self.close()

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the number: ours is gone
        return False
    return True


def _listen(path: Path) -> socket.socket:
    """A listening socket at ``path`` that only this user can reach; refuses a path another worker serves,
    and anything at the path that is not a socket."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = parent.lstat()
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or mode & 0o077:
        raise PermissionError(f"{parent} must be a directory of this user that no one else can enter (mode 700); "
                              f"it is {'not a directory' if not stat.S_ISDIR(st.st_mode) else f'mode {mode:o}'}"
                              f"{', owned by another user' if st.st_uid != os.geteuid() else ''}")
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; give the worker another path")
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
    sock.bind(str(path))
    os.chmod(path, 0o600)  # (the directory already keeps other users out)
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
    parser.add_argument("--parent-pid", type=int, default=None, metavar="PID", help="exit when this process is gone")
    args = parser.parse_args(argv)
    worker = Worker(args.socket, args.slots, args.parent_pid)  # listening before the heavy imports: a ClientApp early in the queue just waits
    print(f"feddiff worker: listening on {args.socket}", flush=True)
    for module in ("feddiff.client.node", "feddiff.client.runtime", "feddiff.engines.experiment"):
        importlib.import_module(module)  # then torch, diffusers and the client's code, once

    worker.serve(args.idle_exit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
