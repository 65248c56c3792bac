"""The threaded CRCs must equal the sequential ones over the joined bytes, whatever the cuts and sizes."""

import random
import zlib

import pytest
import torch
from crc32c import crc32c

from feddiff.compress import crc
from feddiff.compress.wire import Message, MessageError, decode, encode


@pytest.mark.parametrize("total", [0, 1, 7, crc.CHUNK - 1, crc.CHUNK, crc.CHUNK + 1, crc.PARALLEL_MIN,
                                   crc.PARALLEL_MIN + 3 * crc.CHUNK + 12345])
def test_equals_zlib_over_any_cuts(total):
    rng = random.Random(total)
    data = rng.randbytes(total)
    cuts = sorted(rng.sample(range(total + 1), min(6, total + 1)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, total])]
    assert crc.crc32_of(pieces) == zlib.crc32(data)
    assert crc.crc32c_of(pieces) == crc32c(data)


def test_crc32c_is_castagnolis():
    assert crc.crc32c_of([b"1234", b"56789"]) == 0xE3069283  # the standard check value of "123456789"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1 KiB on 3 threads from 4 KiB up, so the threaded path and the joins run on any machine."""
    monkeypatch.setattr(crc, "CHUNK", 1024)
    monkeypatch.setattr(crc, "PARALLEL_MIN", 4096)
    monkeypatch.setattr(crc, "threads", lambda: 3)
    monkeypatch.setattr(crc, "_pool", None)
    submitted = []
    real = crc._executor

    def counting():
        pool = real()
        if getattr(pool, "counted", False):  # the same pool again: count its submissions once
            return pool
        original = pool.submit

        def submit(fn, *args):
            submitted.append(len(args[0]))
            return original(fn, *args)

        pool.submit, pool.counted = submit, True
        return pool

    monkeypatch.setattr(crc, "_executor", counting)
    yield submitted
    crc._pool = None


@pytest.mark.parametrize("total", [4096, 4097, 5 * 1024, 10_000, 65_537])
def test_threaded_path_equals_zlib(small_chunks, total):
    rng = random.Random(total)
    data = rng.randbytes(total)
    cuts = sorted(rng.sample(range(total + 1), 7))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, total])]
    assert crc.crc32_of(pieces) == zlib.crc32(data)
    assert len(small_chunks) == -(-total // 1024)  # every chunk went to the pool
    if total >= 4 * 4096:  # CRC-32C: chunks of 4 KiB from 16 KiB up
        assert crc.crc32c_of(pieces) == crc32c(data)
        assert len(small_chunks) == -(-total // 1024) + -(-total // 4096)


def test_empty_and_multidimensional_buffers():
    import numpy as np

    assert crc.crc32_of([np.zeros((0, 3)), b"", np.arange(6, dtype=np.float32).reshape(2, 3)]) == zlib.crc32(
        np.arange(6, dtype=np.float32).tobytes())


def test_a_forked_child_checks_large_frames(small_chunks):
    import os

    blob = bytes(range(256)) * 64  # 16 KiB: threaded with the fixture's sizes
    assert crc.crc32_of([blob]) == zlib.crc32(blob)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child has no worker threads of the parent's: it must make its own
        import signal

        signal.alarm(20)
        os._exit(0 if crc.crc32_of([blob]) == zlib.crc32(blob) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_combine_and_shift_by_hand():
    # crc(A + B) from the parts; shifting by 0 bytes is the identity
    a, b = b"feddiff ", b"messages"
    assert crc.combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert crc.shift(0x12345678, 0) == 0x12345678
    # a shift by n zero bytes is what zlib does to the raw register over n zeros
    raw = 0xDEADBEEF
    assert crc.shift(raw, 1000) == zlib.crc32(bytes(1000), raw ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def test_chunks_cut_exact_runs():
    runs = crc._chunks([memoryview(b"abcde"), memoryview(b""), memoryview(b"fghij")], 4)
    assert [b"".join(bytes(p) for p in run) for run in runs] == [b"abcd", b"efgh", b"ij"]


def large_message():
    g = torch.Generator().manual_seed(0)
    # float32 elements: over CRC-32C's threshold (4 x PARALLEL_MIN), so the threads check it
    n = crc.PARALLEL_MIN * crc.KINDS["crc32c"][2] // 4 + 1000
    return Message({"w": torch.randn(n, generator=g), "b": torch.randn(7, generator=g)}, {"round": 1})


def test_large_frame_roundtrip_uses_threads():
    m = large_message()
    blob = encode(m)
    assert len(blob) > crc.PARALLEL_MIN * crc.KINDS["crc32c"][2]
    assert int.from_bytes(blob[4:8], "little") == crc32c(blob[8:])  # the frame's checksum is CRC-32C
    out = decode(blob)
    assert torch.equal(out.tensors["w"], m.tensors["w"]) and torch.equal(out.tensors["b"], m.tensors["b"])


@pytest.mark.parametrize("where", ["header", "data", "last"])
def test_large_frame_corruption_is_named_as_one(where):
    # the header is read while the threads check the sum: a damaged header must still be reported
    # as a checksum mismatch, not as whatever the parser tripped on
    blob = bytearray(encode(large_message()))
    pos = {"header": 14, "data": len(blob) // 2, "last": len(blob) - 1}[where]
    blob[pos] ^= 0x10
    with pytest.raises(MessageError, match="checksum mismatch"):
        decode(bytes(blob))
