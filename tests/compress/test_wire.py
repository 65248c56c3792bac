import pytest
import torch

from crc32c import crc32c

from feddiff.compress.wire import Message, MessageError, decode, encode, pack_frame, read_parts, unpack_frame, write_parts


def msg():
    g = torch.Generator().manual_seed(0)
    return Message({"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5), "c": torch.randn(2, dtype=torch.float64)},
                   {"round": 3, "config": {"upload": ["decoder"]}})


def test_roundtrip_exact():
    m = msg()
    out = decode(encode(m))
    assert out.meta == m.meta
    assert list(out.tensors) == list(m.tensors)
    for k in m.tensors:
        assert out.tensors[k].dtype == m.tensors[k].dtype and torch.equal(out.tensors[k], m.tensors[k])


def test_size_is_payload_plus_small_header():
    blob = encode(Message({"w": torch.zeros(10000)}))
    assert 40000 < len(blob) < 40000 + 400


@pytest.mark.parametrize("cut", [1, 10, 100, 1000])
def test_truncated_rejected(cut):
    blob = encode(msg())
    with pytest.raises(MessageError, match="truncated or corrupted|not a feddiff message"):
        decode(blob[:-cut])


def test_flipped_byte_rejected():
    blob = bytearray(encode(msg()))
    blob[len(blob) // 2] ^= 0x40
    with pytest.raises(MessageError, match="checksum"):
        decode(bytes(blob))


def test_garbage_and_version():
    with pytest.raises(MessageError, match="not a feddiff message"):
        decode(b"hello world, not a message")
    blob = bytearray(encode(msg()))
    blob[3] = 99
    with pytest.raises(MessageError, match="version 99"):
        decode(bytes(blob))


def test_inconsistent_header_rejected():
    # a well-framed message whose header lies about a shape: its data no longer fits the layout
    header, parts = read_parts(encode(Message({"w": torch.zeros(4)})))
    header["groups"][0][3] = [[5]]
    with pytest.raises(MessageError, match=r"data section is 16 bytes; the header's groups need 24"):
        decode(write_parts(header, parts))


def frame_with_header(head) -> bytes:
    """A frame with a valid checksum around any header (no data section)."""
    import json
    import zlib

    raw = zlib.compress(json.dumps(head).encode())
    body = len(raw).to_bytes(4, "little") + raw
    return b"FDM\x04" + crc32c(body).to_bytes(4, "little") + body


OK = {"codec": "identity", "codec_config": {}, "meta": {}}


@pytest.mark.parametrize("head, match", [
    ([1, 2], "not a JSON object"),
    ({"meta": {}, "codec": "identity", "codec_config": {}}, "lacks 'groups'"),
    ({**OK, "groups": [5]}, r"malformed group 5"),
    ({**OK, "groups": [["identity", "float32", ["a"], []]]}, "as many names as shapes"),
    ({**OK, "meta": [1], "groups": []}, "meta and codec_config"),
    ({**OK, "groups": [["int8", "float32", ["a"], [[2]]]]}, "neither identity nor the message's 'identity'"),
    ({**OK, "groups": [["identity", "complex64", ["a"], [[2]]]]}, "group dtype 'complex64'"),
    ({**OK, "groups": [["identity", "float32", ["a", "a"], [[1], [1]]]]}, "'a' appears twice"),
    ({**OK, "groups": [["identity", "float32", ["a"], [[1]]], ["identity", "int64", ["a"], [[1]]]]}, "'a' appears twice"),
    ({**OK, "groups": [["identity", "float32", [3], [[1]]]]}, "name 3 is not a string"),
    ({**OK, "groups": [["identity", "float32", ["a"], [[-1]]]]}, r"tensor 'a': invalid shape \[-1\]"),
    ({**OK, "groups": [["identity", "float32", ["a"], [[1.5]]]]}, r"tensor 'a': invalid shape"),
    ({**OK, "groups": [["identity", "float32", ["a"], [5]]]}, r"tensor 'a': invalid shape 5"),
    ({**OK, "codec": "int8", "codec_config": {"bits": 3}, "groups": [["int8", "float32", ["a"], [[1]]]]},
     "message codec: codec 'int8' has no setting"),
    ({**OK, "groups": [["identity", "float32", ["a"], [[2]]]]}, "data section is 0 bytes; the header's groups need 8"),
    ({**OK, "groups": [[["x"], "float32", ["a"], [[1]]]]}, "the codec and dtype are names"),
    ({**OK, "groups": [["identity", ["float32"], ["a"], [[1]]]]}, "the codec and dtype are names"),
    ({**OK, "groups": [["identity", "int64", [], []]]}, "at least one tensor"),
    ({**OK, "codec": "int8", "groups": [["int8", "int64", [], []]]}, "at least one tensor"),
    ({**OK, "groups": [["identity", "float32", ["a"], [[1] * 65]]]}, r"at most 64 dimensions"),
    ({**OK, "groups": [["identity", "float32", ["a"], [[0, 1 << 49]]]]}, r"invalid shape"),
])  # fmt: skip
def test_well_framed_but_malformed_headers_rejected(head, match):
    with pytest.raises(MessageError, match=match):
        decode(frame_with_header(head))


def test_layout_follows_from_the_header():
    # three groups (float32, int64, float64 runs), parts 8-byte aligned, nothing else in the data section
    m = Message({"a": torch.arange(3.0), "b": torch.arange(5), "c": torch.ones(1, dtype=torch.float64)})
    header, data = unpack_frame(encode(m))
    assert header["groups"] == [["identity", "float32", ["a"], [[3]]], ["identity", "int64", ["b"], [[5]]],
                                ["identity", "float64", ["c"], [[1]]]]
    assert len(data) == 16 + 40 + 8
    assert bytes(data[:12]) == torch.arange(3.0).numpy().tobytes() and bytes(data[12:16]) == bytes(4)
    assert bytes(data[16:56]) == torch.arange(5).numpy().tobytes()


def test_decoded_tensors_own_their_memory():
    # decoding reads a read-only frame: nothing decoded may alias it, nor each other
    m = Message({"a": torch.randn(300, 7), "b": torch.randn(5), "c": torch.arange(4)})
    blob = encode(m)
    before = bytes(bytearray(blob))  # a copy (bytes(blob) would be blob itself)
    out = decode(blob).tensors
    for t in out.values():
        t.add_(1)
    assert blob == before
    assert torch.equal(out["b"], m.tensors["b"] + 1) and torch.equal(out["a"], m.tensors["a"] + 1)
    assert torch.equal(out["c"], m.tensors["c"] + 1)


def test_names_may_hold_any_character():
    m = Message({"a#b": torch.ones(2), "": torch.zeros(1), "é/🙂": torch.arange(2)})
    assert {k: v.tolist() for k, v in decode(encode(m)).tensors.items()} == {"a#b": [1.0, 1.0], "": [0.0], "é/🙂": [0, 1]}


def test_tensors_that_require_grad_travel_as_values():
    w = torch.randn(3, requires_grad=True)
    assert torch.equal(decode(encode(Message({"w": w * 2}))).tensors["w"], (w * 2).detach())


def test_pack_frame_round_trips_header_and_data():
    header, data = unpack_frame(pack_frame({"x": [1, "y"]}, b"12345678"))
    assert header == {"x": [1, "y"]} and bytes(data) == b"12345678"


def test_header_bomb_refused():
    import zlib

    head = zlib.compress(b"[" * (80 << 20))
    body = len(head).to_bytes(4, "little") + head
    with pytest.raises(MessageError, match="not exactly one compressed header"):
        decode(b"FDM\x04" + crc32c(body).to_bytes(4, "little") + body)


def test_bytes_are_deterministic():
    m = msg()
    assert len({encode(m) for _ in range(10)}) == 1


def test_empty_and_scalar_tensors():
    m = Message({"e": torch.zeros(0, 3), "s": torch.tensor(2.5), "b": torch.tensor([True, False])})
    out = decode(encode(m)).tensors
    assert out["e"].shape == (0, 3) and out["s"].item() == 2.5 and out["b"].tolist() == [True, False]


def test_a_frame_checked_piece_by_piece_is_the_same_frame(monkeypatch):
    import feddiff.compress.wire as wire
    from feddiff.compress.codecs import make_codec

    g = torch.Generator().manual_seed(1)
    m = Message({f"w{i}": torch.randn(5 + 40 * i, generator=g) for i in range(12)} | {"n": torch.arange(9)},
                {"round": 1})
    for codec in (make_codec("identity"), make_codec("fp16"), make_codec("int8")):
        whole = encode(m, codec)
        monkeypatch.setattr(wire, "_PIECE", 64)  # every frame here now has many pieces
        pieces = encode(m, codec)
        monkeypatch.setattr(wire, "_PIECE", 8 << 20)
        assert pieces == whole and decode(pieces).meta == {"round": 1}


def test_a_bad_tensor_in_a_later_piece_is_named(monkeypatch):
    import feddiff.compress.wire as wire
    from feddiff.compress.codecs import make_codec

    monkeypatch.setattr(wire, "_PIECE", 64)
    tensors = {f"w{i}": torch.ones(30) for i in range(6)}
    tensors["w4"][3] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'w4': fp16: cannot encode .* 1 NaN"):
        encode(Message(tensors), make_codec("fp16"))


def test_a_deeply_nested_header_is_a_malformed_one():
    import zlib

    raw = zlib.compress(b"[" * 100000 + b"]" * 100000)
    body = len(raw).to_bytes(4, "little") + raw
    with pytest.raises(MessageError, match="malformed message header: RecursionError"):
        decode(b"FDM\x04" + crc32c(body).to_bytes(4, "little") + body)


def test_bytes_beside_the_header_are_refused():
    import zlib

    def frame(meta: dict) -> tuple[bytes, int, int]:
        blob = encode(Message({"w": torch.ones(2)}, meta))
        n = int.from_bytes(blob[8:12], "little")
        return blob, n, (-(12 + n)) % 8  # the frame, its header's length, the padding after it

    def checked(body: bytes) -> bytes:
        return b"FDM\x04" + crc32c(body).to_bytes(4, "little") + body

    blob, n, pad = next(f for f in (frame({"x": "a" * i}) for i in range(16)) if f[2] > 0)
    body = bytearray(blob[8:])
    body[4 + n] = 1  # the first byte of the padding
    with pytest.raises(MessageError, match="nonzero padding after the message header"):
        decode(checked(bytes(body)))
    head = zlib.decompress(blob[12 : 12 + n])
    raw = zlib.compress(head) + b"extra"  # a second stream's worth of bytes after the header's
    body = len(raw).to_bytes(4, "little") + raw
    body += bytes((-(12 + len(raw))) % 8) + blob[-8:]
    with pytest.raises(MessageError, match="exactly one compressed header"):
        decode(checked(body))


def test_a_bool_is_zero_or_one():
    header, parts = read_parts(encode(Message({"b": torch.tensor([True, False, True])})))
    parts[0][""] = torch.tensor([1, 2, 0], dtype=torch.uint8).view(torch.bool)
    with pytest.raises(MessageError, match="tensor 'b': identity: a bool tensor holds the byte 2"):
        decode(write_parts(header, parts))
