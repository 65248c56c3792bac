"""The message container: named tensors + a small JSON header, as bytes; validated on decode.

Layout (all integers little-endian)::

    b"FDM" | version: u8 | CRC-32C of everything after this field: u32 | layout length: u32
    | meta length: u32 | layout | meta | zero padding to 8 bytes | storage parts, each 8-byte aligned

The layout and the meta are zlib-compressed UTF-8 JSON objects. The meta holds the message's own
fields (round, counts). The layout holds the codec and its settings and the groups: runs of
consecutive tensors of one dtype and one codec (a model's state dict is one group), each as
``[codec, dtype, names, shapes]``. Every message of a run has the same layout, so both ends keep the
last few layouts they made or checked, by value (the layout's bytes): a message then costs its
tensors, not a header of a few hundred names to write, parse and check again.

A group's storage is one flat array per part of its codec (the identity: the tensors' values; int8:
the levels, then the grids), each tensor's part after the previous tensor's, so the whole layout of
the data section follows from the layout: there are no offsets to trust, and a data section of any
other length is refused before a byte of it is read. Nothing is unpickled, and the bytes are
deterministic for equal inputs. The ledger counts ``len()`` of the frame: header and padding included.

Encoding writes each group straight into the frame (one copy of the identity's bytes, the levels of
int8 written where they travel); decoding copies a group out of the frame in runs of about 1 MiB and
hands out views of those copies. The frame's memory is a ``bytes`` object, not zeroed first, filled
in place before anyone sees it (``io.BytesIO`` returns it without a copy): the padding is written as
zeros and each codec writes every element of its parts.

The checksum is CRC-32C (Castagnoli; hardware-accelerated, 3-4x faster than zlib's CRC-32 here, with
the same 32-bit detection guarantees). Earlier versions (4: one header, layout and meta
together; 3: a storage table with per-part offsets; 2: zlib's CRC-32; 1: a safetensors body) are no
longer written or read: frames are never stored, only sent.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import math
import mmap
import operator
import sys
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from feddiff.compress import crc as _crc
from feddiff.compress.codecs import IDENTITY, Codec, CodecError, TensorError, consecutive_runs, copy_out, make_codec
from feddiff.compress.crc import Pipeline, Running, crc32c_async
from feddiff.types import StateDict

MAGIC = b"FDM"
VERSION = 5
_PREFIX = 16  # magic(3) + version(1) + crc32(4) + layout length(4) + meta length(4)
_ALIGN = 8
_MAX_HEADER = 64 << 20  # a decompressed layout or meta larger than this is refused (zip bombs)
_LAYOUTS = 16  # layouts kept by each end (a run has a few: one per codec and set of tensors)
_KEEP_MAX_TENSORS = 1 << 14  # a received layout of more tensors is not kept (cifar10-ddpm's has 328)
_PIECE = 8 << 20  # frames of two pieces or more have their checksum computed piece by piece as they are written
_HUGE = 8 << 20  # frames from this size on are asked to be backed by huge pages (_advise_huge)
_HUGE_PAGE = 2 << 20
_MAX_DIMS, _MAX_DIM = 64, 1 << 48  # a shape's dimensions, each dimension (torch's limits are near these)
_CRC_BESIDE = 8 << 20  # from this size on, a frame's checksum is computed on a worker thread while it is decoded
_TRAVEL = frozenset((
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
))  # fmt: skip


# decode reads frames through torch.frombuffer, which warns (once per process) that a bytes object is not
# writable: codecs only read it. The warning is spent here, at import, where no other thread can be
# (warnings.catch_warnings around every decode would not be thread-safe).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)


class MessageError(ValueError):
    """Bytes that are not a valid feddiff message: the reason is in the text."""


@dataclass
class Message:
    """What travels on one link: named tensors plus JSON-able fields (round, config, counts)."""

    tensors: StateDict
    meta: dict[str, Any] = field(default_factory=dict)


_DTYPES = {str(d).removeprefix("torch."): d for d in _TRAVEL}


_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in _DTYPES.values()}
_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# The frame: a header dict and a data section <-> bytes


def pack_frame(header: dict[str, Any], data: bytes | memoryview = b"") -> bytes:
    """A frame around ``header`` (its ``meta`` as the meta, the rest as the layout) and ``data`` (the
    data section, as it is). :func:`encode` writes its frames in place instead; this is for tools and
    tests that build frames by hand."""
    layout = _deflate({k: v for k, v in header.items() if k != "meta"})
    meta = _deflate(header.get("meta", {}))
    body = bytearray(_aligned(_PREFIX + len(layout) + len(meta)) - 8)
    body[:8] = len(layout).to_bytes(4, "little") + len(meta).to_bytes(4, "little")
    body[8 : 8 + len(layout) + len(meta)] = layout + meta
    body += data
    return MAGIC + bytes([VERSION]) + crc32c_async([body]).result().to_bytes(4, "little") + bytes(body)


def unpack_frame(blob: bytes) -> tuple[dict[str, Any], memoryview]:
    """Check a frame (checksum included) and return (header: the layout with the ``meta``, data section);
    raises :class:`MessageError`."""
    def read(view: memoryview, _crc: Any) -> tuple[dict[str, Any], memoryview]:
        raw, meta, data_start = _read_header(view)
        return {**_layout_header(raw), "meta": meta}, view[data_start:]

    return _checked_read(blob, read)


def read_parts(blob: bytes) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """(header, each group's storage parts, copied out as flat tensors of their dtypes) of a valid frame.
    For tools and tests that look inside frames or build altered ones with :func:`write_parts`."""
    header, data = unpack_frame(blob)
    groups, size = _groups_from(header)
    if len(data) != size:
        raise MessageError(f"the data section is {len(data)} bytes; the header's groups need {size}")
    raw = bytearray(data)
    return header, [{s: torch.frombuffer(raw, dtype=torch.uint8)[o : o + n].clone().view(dtype) if n
                     else torch.empty(0, dtype=dtype) for s, (dtype, o, n) in g.parts.items()} for g in groups]


def write_parts(header: dict[str, Any], parts: list[dict[str, torch.Tensor]]) -> bytes:
    """A frame of ``header`` and the given parts, in order, each padded to 8 bytes, whatever their sizes
    (the inverse of :func:`read_parts`; what a faulty or hostile sender could make)."""
    data = bytearray()
    for group in parts:
        for t in group.values():
            data += t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            data += bytes(_aligned(len(data)) - len(data))
    return pack_frame(header, bytes(data))


def _deflate(value: Any) -> bytes:
    # level 1: names and shapes compress about as well, at a third of the time of level 6
    return zlib.compress(json.dumps(value, separators=(",", ":"), sort_keys=True).encode(), 1)


def _inflate(raw: bytes, what: str) -> Any:
    """The JSON value of one compressed section; raises :class:`MessageError`."""
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(raw, _MAX_HEADER)
        if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise MessageError(f"message {what} is not exactly one compressed {what} under {_MAX_HEADER} bytes")
        return json.loads(text)
    except MessageError:
        raise
    except (ValueError, UnicodeDecodeError, zlib.error, RecursionError) as err:
        raise MessageError(f"malformed message {what}: {type(err).__name__}: {str(err)[:200]}") from None


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _open(blob: bytes, fused: bool = False) -> tuple[memoryview, Any]:
    """The blob as a memoryview after the cheap checks, and its checksum: being computed on worker threads
    (a large frame), here and now, or (``fused``, a frame under ``_CRC_BESIDE``) as the reader copies
    the frame out (:class:`.crc.Running`)."""
    view = memoryview(blob)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if len(view) < _PREFIX or bytes(view[:3]) != MAGIC:
        raise MessageError(f"not a feddiff message ({len(view)} bytes, starts {bytes(view[:4])!r})")
    if view[3] != VERSION:
        raise MessageError(f"message format version {view[3]} is not supported (expected {VERSION})")
    if fused and _crc.FUSED and len(view) < _CRC_BESIDE:
        return view, Running(view, 8)
    return view, crc32c_async([view[8:]], background=_CRC_BESIDE)


def _check_crc(view: memoryview, crc: Any) -> None:
    if crc.result() != int.from_bytes(view[4:8], "little"):
        raise MessageError(f"message checksum mismatch ({len(view)} bytes): truncated or corrupted")


def _checked_read(blob: bytes, read: Any, fused: bool = False) -> Any:
    """``read(view, checksum)`` of the frame, returned only if the checksum matches: the checksum is
    computed (on worker threads for large frames; ``fused``: by ``read``'s copies as it goes, the rest
    after it) while ``read`` runs, and a corrupted frame is always named as one, whatever else ``read``
    found wrong with it."""
    view, crc = _open(blob, fused)
    try:
        result: Any = read(view, crc)
    except MessageError as err:
        result = err
    except BaseException:  # MemoryError, KeyboardInterrupt: stop the checksum reading the caller's buffer
        crc.cancel()
        raise
    _check_crc(view, crc)
    if isinstance(result, MessageError):
        raise result
    return result


def _read_header(view: memoryview) -> tuple[bytes, dict[str, Any], int]:
    """(the layout's compressed bytes, the meta, offset of the data section); raises :class:`MessageError`."""
    n_layout, n_meta = int.from_bytes(view[8:12], "little"), int.from_bytes(view[12:16], "little")
    if _PREFIX + n_layout + n_meta > len(view):
        raise MessageError(f"layout and meta lengths {n_layout} + {n_meta} run past the end of a "
                           f"{len(view)}-byte message")
    meta = _inflate(bytes(view[_PREFIX + n_layout : _PREFIX + n_layout + n_meta]), "meta")
    if not isinstance(meta, dict):
        raise MessageError("malformed message meta: not a JSON object")
    end = _PREFIX + n_layout + n_meta
    data_start = min(_aligned(end), len(view))
    if any(view[end:data_start]):
        raise MessageError("nonzero padding after the message header")
    return bytes(view[_PREFIX : _PREFIX + n_layout]), meta, data_start


# ----------------------------------------------------------------------------------------------
# Groups: runs of tensors of one dtype and codec, and where their parts lie


@dataclass
class _Group:
    codec: Codec
    dtype: torch.dtype
    names: list[str]
    shapes: list[list[int]]
    numels: list[int]
    sizes: list[torch.Size] = field(default_factory=list)  # the shapes as torch sizes (decode's check)
    parts: dict[str, tuple[torch.dtype, int, int]] = field(default_factory=dict)  # suffix -> (dtype, offset, bytes)

    def blame(self, err: CodecError) -> str:
        """The error's text after the tensor it concerns (a group-wide one: the group's tensors)."""
        if isinstance(err, TensorError) and 0 <= err.index < len(self.names):
            return f"tensor {self.names[err.index]!r}: {err}"
        who = f"tensor {self.names[0]!r}" if len(self.names) == 1 else \
            f"tensors {self.names[0]!r} .. {self.names[-1]!r} ({len(self.names)})" if self.names else "a group"
        return f"{who}: {err}"

    def place(self, offset: int) -> int:
        """Lay the codec's parts out from ``offset`` in the data section; returns the offset after them."""
        try:
            layout = self.codec.group_layout(self.shapes, self.numels, self.dtype)
        except CodecError as err:
            raise MessageError(self.blame(err)) from None
        for suffix, (dtype, counts) in layout.items():
            nbytes = sum(counts) * _ITEMSIZE[dtype]
            self.parts[suffix] = (dtype, offset, nbytes)
            offset = _aligned(offset + nbytes)
        return offset


@dataclass
class _Layout:
    """Where a message's tensors go: its groups, placed, the data section's length and the layout's
    compressed bytes. Kept by both ends and shared: read, never changed, once made."""

    groups: list[_Group]
    spans: list[tuple[int, int]]  # each group's tensors: message.tensors' values [i:j]
    size: int
    raw: bytes


@functools.lru_cache(maxsize=_LAYOUTS)
def _layout_for(codec: Codec, config: tuple, names: tuple[str, ...], shapes: tuple[torch.Size, ...],
                dtypes: tuple[torch.dtype, ...]) -> _Layout:
    """The layout of tensors of these names, shapes and dtypes through ``codec`` (whose ``config``,
    part of the key, is ``codec.config()``'s items: a codec's settings may be changed in place)."""
    groups: list[_Group] = []
    spans: list[tuple[int, int]] = []
    for k, (name, shape, dtype) in enumerate(zip(names, shapes, dtypes)):
        if not groups or dtype is not groups[-1].dtype:
            if dtype not in _TRAVEL:
                raise MessageError(f"tensor {name!r}: dtype {dtype} cannot travel")
            groups.append(_Group(codec if dtype.is_floating_point else IDENTITY, dtype, [], [], []))
            spans.append((k, k))
        group = groups[-1]
        group.names.append(name)
        group.shapes.append(list(shape))
        group.numels.append(math.prod(shape))
        spans[-1] = (spans[-1][0], k + 1)
    size = 0
    for group in groups:
        size = group.place(size)
    raw = _deflate({"codec": codec.name, "codec_config": codec.config(),
                    "groups": [[g.codec.name, _dtype_name(g.dtype), g.names, g.shapes] for g in groups]})
    return _Layout(groups, spans, size, raw)


def _layout_of(message: Message, codec: Codec) -> tuple[_Layout, list[torch.Tensor]]:
    """The message's layout (kept: :func:`_layout_for`) and its tensors, on the CPU."""
    xs = [x if x.is_cpu else x.cpu() for x in message.tensors.values()]
    names, shapes, dtypes = tuple(message.tensors), tuple(map(_SHAPE, xs)), tuple(map(_DTYPE, xs))
    try:
        config = tuple(sorted((k, type(v).__name__, v) for k, v in codec.config().items()))  # (True == 1)
        hash((codec, config))
    except TypeError:  # a codec with settings that cannot be a key: made each time
        return _layout_for.__wrapped__(codec, (), names, shapes, dtypes), xs
    return _layout_for(codec, config, names, shapes, dtypes), xs


_received: OrderedDict[bytes, _Layout] = OrderedDict()  # layouts of frames that passed every check
_received_lock = threading.Lock()


def _checked_layout(raw: bytes) -> _Layout:
    """A received layout (its compressed bytes), checked and placed: one kept by :func:`_keep` if a
    message of it passed, else made here. Raises :class:`MessageError`."""
    with _received_lock:
        layout = _received.get(raw)
        if layout is not None:
            _received.move_to_end(raw)
            return layout
    groups, size = _groups_from(_layout_header(raw))
    return _Layout(groups, [], size, raw)


def _layout_header(raw: bytes) -> dict[str, Any]:
    header = _inflate(raw, "layout")
    if not isinstance(header, dict):
        raise MessageError("malformed message layout: not a JSON object")
    return header


def _keep(layout: _Layout) -> None:
    """Keep a layout once a message of it has passed every check, its checksum included (a corrupted or
    forged frame never is), if it is of a size a run's messages have: its names and shapes stay in
    memory, and a layout of millions of empty tensors would hold gigabytes."""
    if sum(len(g.names) for g in layout.groups) > _KEEP_MAX_TENSORS:
        return
    with _received_lock:
        _received[layout.raw] = layout
        _received.move_to_end(layout.raw)
        while len(_received) > _LAYOUTS:
            _received.popitem(last=False)


def _groups_from(header: dict[str, Any]) -> tuple[list[_Group], int]:
    """The layout's groups, checked and placed, and the data section's length they need."""
    try:
        groups, codec_name, codec_config = header["groups"], header["codec"], header["codec_config"]
    except KeyError as err:
        raise MessageError(f"message layout lacks {err}") from None
    if not (isinstance(groups, list) and isinstance(codec_config, dict)):
        raise MessageError("malformed message layout: groups must be a list, codec_config an object")
    codecs: dict[str, Codec] = {"identity": IDENTITY}
    out, seen, offset = [], set(), 0
    for entry in groups:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[2], list)
                and isinstance(entry[3], list) and len(entry[2]) == len(entry[3])):
            raise MessageError(f"malformed group {str(entry)[:80]}: expected [codec, dtype, names, shapes] "
                               "with as many names as shapes")
        name, dtype_name, names, shapes = entry
        if type(name) is not str or type(dtype_name) is not str or not names:
            raise MessageError(f"malformed group {str(entry)[:80]}: the codec and dtype are names, and a group "
                               "holds at least one tensor")
        if name not in codecs:
            if name != codec_name:
                raise MessageError(f"group codec {name!r} is neither identity nor the message's {codec_name!r}")
            try:
                codecs[name] = make_codec(name, **codec_config)
            except (ValueError, TypeError) as err:
                raise MessageError(f"message codec: {err}") from None
        if dtype_name not in _DTYPES:
            raise MessageError(f"group dtype {dtype_name!r} is not one of {sorted(_DTYPES)}")
        if not all(type(n) is str for n in names):
            raise MessageError(f"tensor name {next(n for n in names if type(n) is not str)!r:.80} is not a string")
        if not seen.isdisjoint(names) or len(set(names)) < len(names):
            for n in names:  # (one pass: the first name seen before)
                if n in seen:
                    raise MessageError(f"tensor {n!r:.200} appears twice in the message")
                seen.add(n)
        seen.update(names)
        bad = next((i for i, s in enumerate(shapes) if not _valid_shape(s)), None)  # (once per layout: kept)
        if bad is not None:
            raise MessageError(f"tensor {names[bad]!r:.200}: invalid shape {str(shapes[bad])[:80]} (at most "
                               f"{_MAX_DIMS} dimensions of 0..{_MAX_DIM})")
        numels = [math.prod(s) for s in shapes]
        group = _Group(codecs[name], _DTYPES[dtype_name], names, shapes, numels, [torch.Size(s) for s in shapes])
        offset = group.place(offset)
        out.append(group)
    return out, offset


def _valid_shape(shape: Any) -> bool:
    return type(shape) is list and len(shape) <= _MAX_DIMS and all(type(d) is int and 0 <= d <= _MAX_DIM
                                                                   for d in shape)


# ----------------------------------------------------------------------------------------------
# Messages: logical tensors through a codec


def encode(message: Message, codec: Codec = IDENTITY, generator: torch.Generator | None = None) -> bytes:
    """Serialize a message; floating-point tensors go through ``codec``, others travel as they are.

    The tensors are read while this runs, some without the GIL: another thread must not resize them
    meanwhile (values changed meanwhile give a frame of mixed values, still a valid one)."""
    layout, xs = _layout_of(message, codec)
    groups = [(g, xs[i:j]) for g, (i, j) in zip(layout.groups, layout.spans)]
    meta = _deflate(message.meta)
    data_start = _aligned(_PREFIX + len(layout.raw) + len(meta))
    frame = io.BytesIO(_uninitialized(data_start + layout.size))  # every byte is written below; not yet shared
    buffer = frame.getbuffer()
    try:
        if len(buffer) >= _HUGE:
            _advise_huge(buffer)
        _fill(buffer, layout.raw + meta, len(layout.raw), data_start, groups, generator)
    finally:
        buffer.release()
    return frame.getvalue()  # the same bytes object, not a copy, now that nothing else points into it


def _fill(buffer: memoryview, head: bytes, n_layout: int, data_start: int,
          groups: list[tuple[_Group, list[torch.Tensor]]], generator: torch.Generator | None) -> None:
    """Write the frame into ``buffer`` (``head``: the layout's bytes, then the meta's). A large frame's
    checksum is computed piece by piece on worker threads as the pieces are written
    (:class:`.crc.Pipeline`): a group with a single part (the identity's values, fp16's) is encoded in
    runs of about ``_PIECE`` bytes for that, which by the codecs' contract (each tensor's storage after
    the previous one's) gives the same bytes."""
    buffer[:3] = MAGIC
    buffer[3] = VERSION
    buffer[8:16] = n_layout.to_bytes(4, "little") + (len(head) - n_layout).to_bytes(4, "little")
    buffer[_PREFIX : _PREFIX + len(head)] = head
    buffer[_PREFIX + len(head) : data_start] = bytes(data_start - _PREFIX - len(head))
    for start, end in _gaps([g for g, _ in groups], len(buffer) - data_start):
        buffer[data_start + start : data_start + end] = bytes(end - start)
    pipelined = len(buffer) >= _PIECE * 2
    crc = Pipeline("crc32c") if pipelined else None
    running = Running(buffer, 8) if _crc.FUSED and not pipelined else None  # (the identity's copies fused)
    done = 8  # the checksum covers buffer[8:], handed to `crc` in order as it is written
    try:
        data = torch.frombuffer(buffer, dtype=torch.uint8, offset=data_start) if len(buffer) > data_start else None
        for group, xs in groups:
            if running is not None and _verbatim(group) and _gather(running, data_start + group.parts[""][1],
                                                                    group.parts[""][2], xs):
                continue
            ((suffix, (dtype, offset, nbytes)),) = group.parts.items() if len(group.parts) == 1 else ((None, (0, 0, 0)),)
            # (one part whose elements are the tensors' own, one each: the identity's, fp16's, bf16's)
            if pipelined and suffix is not None and nbytes >= _PIECE * 2 and sum(group.numels) * dtype.itemsize == nbytes:
                start = offset
                for i, j in consecutive_runs(group.numels, _PIECE // dtype.itemsize):
                    end = start + sum(group.numels[i:j]) * dtype.itemsize
                    _encode(group, xs[i:j], {suffix: data[start:end].view(dtype)}, generator, offset=i)
                    crc.add(buffer[done : data_start + end])
                    start, done = end, data_start + end
            else:
                _encode(group, xs, {s: data[o : o + n].view(dt) if n else torch.empty(0, dtype=dt)
                                    for s, (dt, o, n) in group.parts.items()}, generator)
        if running is not None:  # checked as written where fused, the rest now
            buffer[4:8] = running.result().to_bytes(4, "little")
        elif crc is None:  # written in one go: checked in one go (on threads if large: crc.py)
            buffer[4:8] = crc32c_async([buffer[8:]]).result().to_bytes(4, "little")
        else:
            crc.add(buffer[done:])
            buffer[4:8] = crc.result().to_bytes(4, "little")
    except BaseException:
        if crc is not None:
            crc.cancel()  # the workers read the buffer: wait for them before it goes
        raise
    finally:
        data = None


def _gaps(groups: list[_Group], size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the padding of a data section of ``size`` bytes: between and after the parts,
    the bytes no codec writes (an encoder writes them as zeros, a decoder refuses anything else)."""
    end = 0
    for group in groups:
        for _, offset, nbytes in group.parts.values():
            if offset > end:
                yield end, offset
            end = offset + nbytes
    if size > end:
        yield end, size


def _uninitialized(n: int) -> bytes:
    """A new ``bytes`` object of ``n`` bytes, not zeroed (CPython's ``PyBytes_FromStringAndSize(NULL,
    n)``; elsewhere ``bytes(n)``). Zeroing a 4 MB frame took as long as a third of copying the tensors
    into it; the encoder writes every byte anyway."""
    make = _bytes_maker()
    return make(None, n) if make is not None else bytes(n)


@functools.cache
def _bytes_maker() -> Any:
    if sys.implementation.name != "cpython":
        return None
    # (a prototype of our own: setting restype on ctypes.pythonapi's would change it for everyone)
    return ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
        ("PyBytes_FromStringAndSize", ctypes.pythonapi))


def _encode(group: _Group, xs: list[torch.Tensor], out: dict[str, torch.Tensor], generator: torch.Generator | None,
            offset: int = 0) -> None:
    try:
        with torch.no_grad():  # the caller's tensors may require grad; their values are what travel
            group.codec.encode_group(xs, out, generator)
    except TensorError as err:
        raise CodecError(group.blame(TensorError(err.index + offset, str(err)))) from None
    except CodecError as err:
        raise CodecError(group.blame(err)) from None


def _advise_huge(buffer: memoryview) -> None:
    """Ask Linux to back a large frame, not yet written, with 2 MiB pages.

    A frame over glibc's largest mmap threshold (32 MiB) is always fresh memory, and writing it takes
    one page fault per 4 KiB: for the 143 MB cifar10-ddpm model, filling a fresh buffer took 50 ms,
    with huge pages 32 ms, and a buffer already touched 21 ms. numpy gives its large arrays the same
    advice. Best effort: on other systems, or where the kernel declines, nothing changes.
    """
    madvise = _madvise()
    if madvise is None:
        return
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    start, end = -(-address // _HUGE_PAGE) * _HUGE_PAGE, (address + len(buffer)) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        madvise(start, end - start, mmap.MADV_HUGEPAGE)


@functools.cache
def _madvise() -> Any:
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


def decode(blob: bytes) -> Message:
    """Parse and validate bytes made by :func:`encode`; raises :class:`MessageError`.

    The checksum is computed on worker threads while this one reads the header and copies the
    tensors out; nothing is returned, and no other error is reported, unless the checksum matches
    (a corrupted frame is always named as one).
    """
    message, layout = _checked_read(blob, _decode, fused=True)
    _keep(layout)
    return message


def _decode(view: memoryview, crc: Any) -> tuple[Message, _Layout]:
    raw, meta, data_start = _read_header(view)
    layout = _checked_layout(raw)
    groups, size = layout.groups, layout.size
    if len(view) - data_start != size:
        raise MessageError(f"the data section is {len(view) - data_start} bytes; the header's groups need {size}")
    tensors: StateDict = {}
    for start, end in _gaps(groups, size):  # padding is zero: one frame per message, nothing beside the parts
        if any(view[data_start + start : data_start + end]):
            raise MessageError(f"nonzero padding before byte {end} of the data section" if end < size else
                               f"nonzero padding after byte {start} of the data section")
    if size:  # the frame is read-only (torch's warning is spent at import): codecs only read it, and copy out
        data = torch.frombuffer(view, dtype=torch.uint8, offset=data_start)
    copy = _fused_copy(crc, data.data_ptr() - data_start) if size and isinstance(crc, Running) else None
    for group in groups:
        raw = {s: data[o : o + n] for s, (_, o, n) in group.parts.items()} if size else \
            {s: torch.empty(0, dtype=torch.uint8) for s in group.parts}
        try:
            if copy is not None and _verbatim(group):  # the identity's bytes: copied out, checked on the way
                xs = copy_out(raw[""], group.dtype, group.shapes, group.numels, copy)
            else:
                xs = group.codec.decode_group(raw, group.shapes, group.numels, group.dtype)
        except CodecError as err:
            raise MessageError(group.blame(err)) from None
        except (RuntimeError, ValueError, TypeError) as err:  # a codec's bug must not pass for a valid message
            raise MessageError(f"{group.blame(CodecError(str(err)))} (while decoding)") from None
        if len(xs) != len(group.names) or list(map(_SHAPE, xs)) != group.sizes or \
                any(dtype != group.dtype for dtype in set(map(_DTYPE, xs))):
            # (a codec's bug must not pass for a valid message)
            raise MessageError(f"{group.blame(CodecError('decoded tensors do not match the header'))}")
        tensors.update(zip(group.names, xs))
    return Message(tensors, meta), layout


def _verbatim(group: _Group) -> bool:
    """Whether the group's one part holds its tensors' own bytes, in order (the identity's; bools go
    through the codec, which checks that each byte is 0 or 1)."""
    if not group.codec.verbatim or group.dtype is torch.bool or len(group.parts) != 1:
        return False
    dtype, _, nbytes = group.parts[""] if "" in group.parts else (None, 0, -1)
    return dtype is group.dtype and nbytes == sum(group.numels) * _ITEMSIZE[dtype]


def _gather(running: Running, start: int, nbytes: int, xs: list[torch.Tensor]) -> bool:
    """Write the tensors' bytes, one after another, into the frame from ``start`` (``nbytes`` in all),
    checksum fused in; False, with nothing written, for tensors without plain memory of their own
    (sparse ones, efficient zero tensors): the codec's path takes them (and says what is wrong)."""
    try:
        xs = [x.resolve_neg().contiguous() if x.is_neg() or not x.is_contiguous() else x for x in xs]
        running.gather(start, [(x.data_ptr(), x.nbytes) for x in xs], nbytes)  # (checks every piece first)
    except (RuntimeError, ValueError):
        return False
    return True


def _fused_copy(crc: Running, base: int) -> Any:
    """``convert`` for :func:`.codecs.copy_out`: a new tensor of the frame's values ``stored`` (a view of
    the frame, whose first byte is at address ``base``), copied out with the checksum computed on the
    way where the copies come in order (else a plain copy: its bytes are checked by ``crc`` anyway)."""
    def copy(stored: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(stored)
        if out.numel() and crc.copy_out(stored.data_ptr() - base, out.view(torch.uint8).numpy()):
            return out
        return out.copy_(stored)
    return copy
