"""The fused copy + CRC-32C (``_copycrc.c``, used through :class:`crc.Running`): the same bytes and the
same checksums as a copy and the ``crc32c`` package, and the same frames as the two-pass path."""

import os
import platform
import random

import pytest
import torch
from crc32c import crc32c

from feddiff.compress import crc, wire
from feddiff.compress.codecs import make_codec
from feddiff.compress.wire import Message, MessageError, decode, encode

try:
    from feddiff.compress import _copycrc as native
except ImportError:  # built without a C compiler: the tests of the extension itself skip, the others run
    native = None
needs_cpu = pytest.mark.skipif(native is None or not native.hardware, reason="not built, or the CPU lacks SSE4.2/AVX2")


def test_it_is_built_and_on_where_the_cpu_has_the_instructions():
    # a silent build failure (setup.py's extension is optional) would leave the fused path untested
    if platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo") or os.environ.get("FEDDIFF_COPYCRC") == "0":
        pytest.skip("not x86-64 Linux, or turned off")
    flags = open("/proc/cpuinfo").read()
    if " sse4_2" not in flags or " avx2" not in flags:
        pytest.skip("this CPU lacks SSE4.2/AVX2")
    import shutil
    import sysconfig

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip(f"no C compiler ({compiler}) or no Python headers here: the optional extension cannot be built")
    from feddiff.compress import _copycrc  # an ImportError here: setup.py did not build it (no gcc? no Python.h?)

    assert _copycrc.hardware == 1 and crc.FUSED


@needs_cpu
def test_copy_is_a_copy_and_the_castagnoli_crc():
    src = b"123456789"
    dst = bytearray(9)
    assert native.copy(dst, src) == 0xE3069283 and dst == src  # the standard check value
    # continued from a CRC, as crc32c(data, value): the CRC of the two pieces joined
    assert native.copy(bytearray(5), src[4:], native.copy(bytearray(4), src[:4])) == 0xE3069283


@needs_cpu
@pytest.mark.parametrize("size", [0, 1, 7, 8, 31, 32, 33, 6143, 6144, 6145, 12289, 100_003])
def test_copy_equals_the_package_at_any_size_and_alignment(size):
    rng = random.Random(size)
    for skew in (0, 1, 5):  # lanes of 3 x 2 KiB, 32-byte stores, 8-byte words, then single bytes
        src = memoryview(rng.randbytes(size + skew))[skew:]
        value = rng.getrandbits(32)
        dst = bytearray(size + 7)
        assert native.copy(memoryview(dst)[3 : 3 + size], src, value) == crc32c(src, value)
        assert dst[3 : 3 + size] == src and dst[:3] == bytes(3) and dst[3 + size :] == bytes(4)  # nothing beside


@needs_cpu
def test_gather_writes_the_pieces_one_after_another():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g) for n in (0, 1, 3, 1000, 5000, 7001)]
    pieces = [(x.data_ptr(), x.nbytes) for x in xs]
    joined = b"".join(x.numpy().tobytes() for x in xs)
    dst = bytearray(len(joined) + 24)
    assert native.gather(dst, 16, pieces, 7) == crc32c(joined, 7)
    assert dst[16 : 16 + len(joined)] == joined and dst[:16] == bytes(16) and dst[16 + len(joined) :] == bytes(8)


@needs_cpu
def test_gather_refuses_what_does_not_fit_before_writing():
    x = torch.arange(4, dtype=torch.int32)
    dst = bytearray(20)
    for args, error, match in [((dst, 5, [(x.data_ptr(), 16)]), ValueError, r"pieces from offset 5 do not fit in 20 \(piece 0: 16 bytes after 0\)"),
                               ((dst, -1, []), ValueError, "offset -1 is outside dst's 20 bytes"),
                               ((dst, 21, []), ValueError, "offset 21 is outside"),
                               ((dst, 0, [(x.data_ptr(), -1)]), ValueError, "piece 0 has size -1"),
                               ((dst, 0, [(0, 4)]), ValueError, "piece 0 has size 4"),
                               ((dst, 0, [(x.data_ptr(),)]), TypeError, "piece 0 is not an"),
                               ((dst, 0, 5), TypeError, "pieces must be a sequence"),
                               ((b"read-only", 0, []), TypeError, "read-write")]:
        with pytest.raises(error, match=match):
            native.gather(*args)
        assert dst == bytearray(20)
    with pytest.raises(ValueError, match="dst has 3 bytes, src 2"):
        native.copy(bytearray(3), b"ab")


@needs_cpu
def test_running_checks_what_lies_between_and_only_goes_forward(monkeypatch):
    monkeypatch.setattr(crc, "FUSED", True)
    frame = bytearray(random.Random(1).randbytes(100))
    x = torch.arange(6, dtype=torch.int16)
    running = crc.Running(memoryview(frame), 8)
    with pytest.raises(ValueError, match="the pieces hold 12 bytes, not 13"):
        running.gather(20, [(x.data_ptr(), x.nbytes)], 13)
    assert running.done == 8
    running.gather(20, [(x.data_ptr(), x.nbytes)], 12)  # bytes 8..20 checked as they are, then the piece written
    assert frame[20:32] == x.numpy().tobytes() and running.done == 32
    with pytest.raises(RuntimeError, match="go forward"):
        running.gather(30, [], 0)
    out = bytearray(10)
    assert running.copy_out(40, out) and out == frame[40:50]
    assert not running.copy_out(45, bytearray(2))  # checked already: the caller copies
    assert not running.copy_out(95, bytearray(6))  # past the end
    assert running.result() == crc32c(bytes(frame[8:]))
    monkeypatch.setattr(crc, "FUSED", False)
    assert not crc.Running(memoryview(frame)).copy_out(0, bytearray(1))


def message(big: int = 5000):
    g = torch.Generator().manual_seed(3)
    odd = torch.randn(6, 5, generator=g)
    ints = torch.randint(-100, 100, (9,), generator=g)
    return Message({"a": torch.randn(4, 3, generator=g), "n": torch.arange(7), "t": odd.t(),  # not contiguous
                    "neg": torch._neg_view(torch.randn(5, generator=g)), "e": torch.zeros(0, 2),
                    "zero": torch._efficientzerotensor(4),  # (no memory of its own: data_ptr() is 0)
                    "h": torch.randn(3, dtype=torch.float64, generator=g), "b": torch.tensor([True, False]),
                    "bf": torch.randn(7, generator=g).to(torch.bfloat16), "i8": ints.to(torch.int8),
                    "u8": ints.abs().to(torch.uint8), "i16": ints.to(torch.int16), "i32": ints.to(torch.int32),
                    "big": torch.randn(big, generator=g)}, {"round": 2})


@pytest.mark.parametrize("codec, size", [("identity", "small"), ("fp16", "small"), ("int8", "small"),
                                         ("identity", "12 MiB"), ("identity", "17 MiB")])
def test_fused_frames_are_the_two_pass_frames(monkeypatch, codec, size):
    # (12 MiB: fused on encode, the checksum on a thread beside the decode; 17 MiB: neither, pipelined)
    m = message({"small": 5000, "12 MiB": 3 << 20, "17 MiB": 17 << 18}[size])
    monkeypatch.setattr(crc, "FUSED", False)
    plain = encode(m, make_codec(codec))
    want = decode(plain).tensors
    monkeypatch.setattr(crc, "FUSED", native is not None and native.hardware == 1)  # (without it: two passes)
    assert encode(m, make_codec(codec)) == plain
    got = decode(plain).tensors
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                           for k in want)
    if codec == "identity":
        assert all(torch.equal(got[k], m.tensors[k]) for k in m.tensors)
        assert not any(got[k].data_ptr() == m.tensors[k].data_ptr() for k in m.tensors if m.tensors[k].numel())


def test_decoded_tensors_are_not_views_of_the_frame():
    m = message()
    frame = bytearray(encode(m))
    got = decode(frame).tensors  # (a writable frame: a view of it would change with it)
    frame[16:] = bytes(len(frame) - 16)
    assert all(torch.equal(got[k], m.tensors[k]) for k in m.tensors)


@needs_cpu
def test_a_tensor_written_while_it_is_sent_still_gives_frames_that_check(monkeypatch):
    # the checksum is of the bytes written into the frame: a tensor that another thread changes while it
    # is copied gives a frame of mixed values, but never one that fails its own checksum
    import threading

    x = torch.zeros(1 << 18)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            x.add_(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(1500):
            decode(encode(Message({"x": x})))  # raises "checksum mismatch" if the CRC read other bytes
    finally:
        stop.set()
        thread.join()


@needs_cpu
def test_the_identity_is_copied_once_each_way(monkeypatch):
    # the fused path is the one taken: one gather per identity group on encode, one copy per run on
    # decode (what makes a round trip read its bytes twice, not four times)
    calls = []

    class Spy:
        hardware = 1

        def gather(self, *args):
            calls.append("gather")
            return native.gather(*args)

        def copy(self, *args):
            calls.append("copy")
            return native.copy(*args)

    monkeypatch.setattr(crc, "FUSED", True)
    monkeypatch.setattr(crc, "_copycrc", Spy())
    m = Message({"w": torch.ones(3, 4), "n": torch.arange(3), "v": torch.ones(5)})  # groups: float, int64, float
    blob = encode(m)
    assert calls == ["gather"] * 3
    calls.clear()
    assert torch.equal(decode(blob).tensors["v"], torch.ones(5)) and calls == ["copy"] * 3


@needs_cpu
@pytest.mark.parametrize("where", ["header", "first group", "last group", "padding"])
def test_a_corrupted_frame_is_named_as_one_whatever_the_fused_reader_copied(where):
    m = Message({"w": torch.ones(3, 4), "n": torch.arange(3), "v": torch.ones(5)}, {"round": 1})
    blob = bytearray(encode(m))
    data_end = len(blob)
    at = {"header": 17, "first group": data_end - 24 - 40 - 24, "last group": data_end - 10,
          "padding": data_end - 2}[where]
    blob[at] ^= 0x01
    with pytest.raises(MessageError, match="checksum mismatch"):
        decode(bytes(blob))


@needs_cpu
def test_a_message_error_after_a_fused_copy_is_still_a_checksum_error_first(monkeypatch):
    # a frame whose identity group was copied out (and checked) before a later group is found bad: a
    # corrupted frame is named as corrupted, a valid frame's own error is reported
    from feddiff.compress.wire import read_parts, write_parts

    header, parts = read_parts(encode(Message({"w": torch.ones(4), "b": torch.tensor([True, False])})))
    parts[1][""] = torch.tensor([1, 2], dtype=torch.uint8).view(torch.bool)
    bad = write_parts(header, parts)
    with pytest.raises(MessageError, match="tensor 'b': identity: a bool tensor holds the byte 2"):
        decode(bad)
    broken = bytearray(bad)
    broken[-1] ^= 0x10  # (padding after the bools)
    with pytest.raises(MessageError, match="checksum mismatch"):
        decode(bytes(broken))


def test_with_fused_copies_off_nothing_changes_but_the_passes(monkeypatch):
    monkeypatch.setattr(crc, "FUSED", False)
    m = message()
    blob = encode(m)
    assert wire.decode(blob).meta == {"round": 2}
    with pytest.raises(RuntimeError, match="fused copies are off"):
        crc.Running(memoryview(bytearray(8))).gather(0, [], 0)


@needs_cpu
def test_gather_sizes_that_overflow_when_added_are_refused():
    # sizes whose sum wraps around to a small number must not pass the bounds check (it wrote past dst)
    x = torch.zeros(2)
    dst = bytearray(8)
    huge = (1 << 63) - 1
    with pytest.raises(ValueError, match="do not fit in 8"):
        native.gather(dst, 0, [(x.data_ptr(), huge), (x.data_ptr(), huge), (x.data_ptr(), 2)])
    with pytest.raises(ValueError, match="do not fit in 8"):
        native.gather(dst, 0, [(x.data_ptr(), 4), (x.data_ptr(), huge)])
    with pytest.raises(ValueError, match="do not fit in 8"):
        native.gather(dst, 4, [(x.data_ptr(), 8)])
    assert dst == bytearray(8)


@needs_cpu
def test_a_crc_beyond_32_bits_is_refused():
    with pytest.raises(OverflowError, match="32-bit"):
        native.copy(bytearray(1), b"a", (1 << 32) + 5)
    with pytest.raises(OverflowError):
        native.copy(bytearray(1), b"a", -1)
