"""CRCs of a sequence of buffers, computed on several threads, equal to the sequential one.

Two CRCs: CRC-32 (zlib's; checkpoint files) and CRC-32C (Castagnoli, hardware-accelerated by the
``crc32c`` package, 3-4x faster than zlib's CRC-32 here; the wire frames). Both release the GIL on
large buffers, so chunks of a message can be checked side by side (and beside a copy on the main
thread). The chunk CRCs are joined with the zero-shift operator that zlib's ``crc32_combine`` uses
(not exposed by Python's zlib): for finalized CRCs ``a`` of ``A`` and ``b`` of ``B``,
``crc(A + B) = Z_len(B)(a) ^ b``, where ``Z_n`` is the linear map that runs the CRC register over ``n``
zero bytes. ``Z_n`` is kept as the images of the 32 basis bits, made once per length from ``Z_1``
(taken from the CRC function itself) by squaring.

    crc32_of([blob])                     # == zlib.crc32(blob)
    crc32c_of([blob])                    # == crc32c.crc32c(blob)
    running = Running(frame); running.gather(16, [(address, size), ...], nbytes); running.result()
    future = crc32_async([head, *parts]) # a concurrent.futures-like object; .result() is the CRC
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import crc32c as _crc32c

try:
    from feddiff.compress import _copycrc
except ImportError:  # built without a C compiler (setup.py): the copy and the checksum as two passes
    _copycrc = None  # type: ignore[assignment]

CHUNK = 1 << 20  # bytes per task; a multiple of it is cheap to shift by (one cached operator)
PARALLEL_MIN = 8 * CHUNK  # below this, one sequential zlib.crc32 is as fast as the hand-off (measured)
_MASK = 0xFFFFFFFF
# name -> (the CRC continued over one buffer: fn(data, crc_so_far), bytes per task, least bytes for threads);
# CRC-32C runs at 10-17 GB/s on one core here: its chunks are larger, and small frames stay on one thread
KINDS = {"crc32": (zlib.crc32, 1, 1), "crc32c": (lambda data, value=0: _crc32c.crc32c(data, value), 4, 4)}

# A copy and its CRC-32C in one pass (_copycrc.c; x86-64 with SSE4.2 and AVX2): what Running uses.
# FEDDIFF_COPYCRC=0 turns it off (the same bytes and checksums, two passes).
FUSED = _copycrc is not None and bool(_copycrc.hardware) and os.environ.get("FEDDIFF_COPYCRC", "1") != "0"

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@lru_cache(maxsize=None)
def threads() -> int:
    """Worker threads used for large buffers: the machine's cores, at most 4 (asked once: the question
    reads /sys, and cost 15 us on every message)."""
    return max(1, min(4, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="feddiff-crc")
        return _pool


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's worker threads (nor a sane lock): start afresh."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _apply(op: tuple[int, ...], x: int) -> int:
    out, i = 0, 0
    while x:
        if x & 1:
            out ^= op[i]
        x >>= 1
        i += 1
    return out


@lru_cache(maxsize=None)
def _zeros_pow2(k: int, kind: str = "crc32") -> tuple[int, ...]:
    """The operator for 2**k zero bytes, as the images of bits 0..31."""
    if k == 0:
        fn = KINDS[kind][0]
        return tuple(fn(b"\0", (1 << i) ^ _MASK) ^ _MASK for i in range(32))
    half = _zeros_pow2(k - 1, kind)
    return tuple(_apply(half, half[i]) for i in range(32))


def shift(crc: int, n: int, kind: str = "crc32") -> int:
    """``crc`` as if ``n`` zero bytes followed: apply ``Z_n``."""
    k = 0
    while n:
        if n & 1:
            crc = _apply(_zeros_pow2(k, kind), crc)
        n >>= 1
        k += 1
    return crc


def combine(crc_a: int, crc_b: int, len_b: int, kind: str = "crc32") -> int:
    """The CRC of ``A + B`` from the CRCs of ``A`` and ``B`` (zlib's crc32_combine)."""
    return shift(crc_a, len_b, kind) ^ crc_b


def _chunks(buffers: list[memoryview], size: int) -> list[list[memoryview]]:
    """Cut the concatenation of ``buffers`` into runs of ``size`` bytes (the last may be shorter)."""
    out: list[list[memoryview]] = [[]]
    room = size
    for buf in buffers:
        pos, n = 0, len(buf)
        while pos < n:
            if room == 0:
                out.append([])
                room = size
            take = min(room, n - pos)
            out[-1].append(buf[pos : pos + take])
            pos += take
            room -= take
    return out


def _crc_run(pieces: list[memoryview], kind: str = "crc32") -> tuple[int, int]:
    fn = KINDS[kind][0]
    crc = n = 0
    for p in pieces:
        crc = fn(p, crc)
        n += len(p)
    return crc, n


class _Done:
    """A finished result with the Future interface used here."""

    def __init__(self, value: int):
        self._value = value

    def result(self) -> int:
        return self._value

    def cancel(self) -> None:
        pass


class _Joined:
    """The CRC of all chunks, joined in order once every chunk's task has finished."""

    def __init__(self, futures: list[Future], kind: str = "crc32"):
        self._futures, self._kind = futures, kind

    def result(self) -> int:
        crc = 0
        try:
            for i, f in enumerate(self._futures):
                c, n = f.result()
                crc = c if i == 0 else combine(crc, c, n, self._kind)
        except BaseException:
            self.cancel()
            raise
        return crc

    def cancel(self) -> None:
        """Drop the chunks not started and wait for the running ones (they read the caller's buffer)."""
        for f in self._futures:
            f.cancel()
        for f in self._futures:
            if not f.cancelled():
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - only waiting here; the caller has its own error
                    pass


def crc_async(buffers: list, kind: str = "crc32", background: int | None = None) -> _Done | _Joined:
    """Start the CRC (``kind``: "crc32" or "crc32c") of the concatenation of ``buffers``; ``.result()``
    waits and returns it.

    ``background``: from this many bytes on, a buffer too small to be cut into chunks is still checked
    on a worker thread, in one piece, so that the caller can work beside it (a decoder copying the
    tensors out); below it, and without it, such a buffer is checked here and now.
    """
    _, chunk_scale, min_scale = KINDS[kind]
    views = [v.cast("B") for v in map(memoryview, buffers) if v.nbytes]  # (empty ones may not cast)
    total = sum(len(v) for v in views)
    chunked = PARALLEL_MIN * min_scale  # from here on the buffers are cut into chunks, one task each
    if threads() == 1 or total < (chunked if background is None else min(chunked, background)):
        return _Done(_crc_run(views, kind)[0])
    size = CHUNK * chunk_scale if total >= chunked else total
    futures: list[Future] = []
    try:
        pool = _executor()
        for run in _chunks(views, size):
            futures.append(pool.submit(_crc_run, run, kind))
    except RuntimeError:  # no new threads at interpreter shutdown: check it here
        _Joined(futures, kind).cancel()
        return _Done(_crc_run(views, kind)[0])
    return _Joined(futures, kind)


class Pipeline:
    """The CRC of buffers that become ready one after another (a frame written piece by piece): each is
    checked on a worker thread as soon as it is added, beside the writing of the next, and
    :meth:`result` joins them in order. A buffer must not change once added."""

    def __init__(self, kind: str = "crc32c"):
        self._kind, self._futures = kind, []

    def add(self, buffer: Any) -> None:
        """Start checking ``buffer``, in chunks on the worker threads if it is large."""
        view = memoryview(buffer)
        if not view.nbytes:
            return
        view = view.cast("B")
        size = CHUNK * KINDS[self._kind][1]
        for start in range(0, len(view), size):
            piece = view[start : start + size]
            if threads() > 1:
                try:
                    self._futures.append(_executor().submit(_crc_run, [piece], self._kind))
                    continue
                except RuntimeError:  # no new threads at interpreter shutdown: check it here
                    pass
            done: Future = Future()
            done.set_result(_crc_run([piece], self._kind))
            self._futures.append(done)

    def result(self) -> int:
        """The CRC of the concatenation of everything added (waits for the workers)."""
        return _Joined(self._futures, self._kind).result() if self._futures else 0

    def cancel(self) -> None:
        """Stop checking (the caller's buffers are about to go)."""
        _Joined(self._futures, self._kind).cancel()


def crc32_async(buffers: list) -> _Done | _Joined:
    """Start the CRC-32 of the concatenation of ``buffers``; ``.result()`` waits and returns it."""
    return crc_async(buffers, "crc32")


def crc32c_async(buffers: list, background: int | None = None) -> _Done | _Joined:
    """Start the CRC-32C of the concatenation of ``buffers``; ``.result()`` waits and returns it."""
    return crc_async(buffers, "crc32c", background)


def crc32_of(buffers: list) -> int:
    """CRC-32 of the concatenation of ``buffers``, equal to ``zlib.crc32`` of the joined bytes."""
    return crc32_async(buffers).result()


def crc32c_of(buffers: list) -> int:
    """CRC-32C of the concatenation of ``buffers``, equal to ``crc32c.crc32c`` of the joined bytes."""
    return crc32c_async(buffers).result()


class Running:
    """The CRC-32C of ``frame[start:]`` (a flat memoryview of bytes), computed front to back while the
    frame is written or read, with the copies into and out of it fused in: each copied byte is read
    once, for both (``_copycrc``, where :data:`FUSED`). One frame of a few MB is then read twice instead
    of four times in a round trip. The same interface as :func:`crc32c_async`'s result.

    ``start``: the first byte covered. Everything before :attr:`done` has been checked; the methods
    move it forward, never back, checking the bytes in between as they are (already written).
    """

    def __init__(self, frame: memoryview, start: int = 0):
        self.frame, self.done, self._crc = frame, start, 0

    def upto(self, end: int) -> None:
        """Check the frame up to ``end``."""
        if end > self.done:
            self._crc = _crc32c.crc32c(self.frame[self.done : end], self._crc)
            self.done = end

    def gather(self, offset: int, pieces: list[tuple[int, int]], nbytes: int) -> None:
        """Write ``pieces`` (address, size: memory the caller keeps alive and unchanged for the call),
        ``nbytes`` in all, one after another into the (writable) frame from ``offset`` (at or after
        :attr:`done`), checked on the way; ValueError, with nothing written, if they are not ``nbytes``."""
        if not FUSED or offset < self.done:
            raise RuntimeError(f"gather at {offset}: fused copies {'are off' if not FUSED else 'go forward'}"
                               f" (checked up to {self.done})")
        total = sum(size for _, size in pieces)
        if total != nbytes:
            raise ValueError(f"gather at {offset}: the pieces hold {total} bytes, not {nbytes}")
        self.upto(offset)
        self._crc = _copycrc.gather(self.frame, offset, pieces, self._crc)
        self.done = offset + nbytes

    def copy_out(self, offset: int, out: Any) -> bool:
        """Copy ``len(out)`` bytes of the frame from ``offset`` into ``out`` (a writable buffer), checked
        on the way; False, with nothing copied, if the bytes were checked already (or fused copies are
        off): the caller copies them itself."""
        n = memoryview(out).nbytes
        if not FUSED or offset < self.done or offset + n > len(self.frame):
            return False
        self.upto(offset)
        self._crc = _copycrc.copy(out, self.frame[offset : offset + n], self._crc)
        self.done = offset + n
        return True

    def result(self) -> int:
        """The CRC of the whole frame from ``start`` (the rest checked now)."""
        self.upto(len(self.frame))
        return self._crc

    def cancel(self) -> None:
        """Nothing runs beside the caller."""
