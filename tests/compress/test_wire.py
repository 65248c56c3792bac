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


def checked(layout: bytes, meta: bytes, data: bytes = b"") -> bytes:
    """A version-5 frame with a valid checksum around these compressed sections, as they are."""
    body = len(layout).to_bytes(4, "little") + len(meta).to_bytes(4, "little") + layout + meta
    body += bytes((-(16 + len(layout) + len(meta))) % 8) + data
    return b"FDM\x05" + crc32c(body).to_bytes(4, "little") + body


def frame_with_header(head) -> bytes:
    """A frame with a valid checksum around any header (its meta as the meta, the rest as the layout;
    no data section)."""
    import json
    import zlib

    meta = head.get("meta", {}) if isinstance(head, dict) else {}
    layout = {k: v for k, v in head.items() if k != "meta"} if isinstance(head, dict) else head
    return checked(zlib.compress(json.dumps(layout).encode()), zlib.compress(json.dumps(meta).encode()))


OK = {"codec": "identity", "codec_config": {}, "meta": {}}


@pytest.mark.parametrize("head, match", [
    ([1, 2], "layout: not a JSON object"),
    ({"meta": {}, "codec": "identity", "codec_config": {}}, "lacks 'groups'"),
    ({**OK, "groups": [5]}, r"malformed group 5"),
    ({**OK, "groups": [["identity", "float32", ["a"], []]]}, "as many names as shapes"),
    ({**OK, "meta": [1], "groups": []}, "meta: not a JSON object"),
    ({**OK, "codec_config": [1], "groups": []}, "codec_config an object"),
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
    header, data = unpack_frame(pack_frame({"x": [1, "y"], "meta": {"r": 2}}, b"12345678"))
    assert header == {"x": [1, "y"], "meta": {"r": 2}} and bytes(data) == b"12345678"


def test_header_bomb_refused():
    import zlib

    bomb, empty = zlib.compress(b"[" * (80 << 20)), zlib.compress(b"{}")
    with pytest.raises(MessageError, match="layout is not exactly one compressed layout"):
        decode(checked(bomb, empty))
    with pytest.raises(MessageError, match="meta is not exactly one compressed meta"):
        decode(checked(empty, bomb))


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

    raw, empty = zlib.compress(b"[" * 100000 + b"]" * 100000), zlib.compress(b"{}")
    with pytest.raises(MessageError, match="malformed message layout: RecursionError"):
        decode(checked(raw, empty))
    with pytest.raises(MessageError, match="malformed message meta: RecursionError"):
        decode(checked(empty, raw))


def test_bytes_beside_the_header_are_refused():
    import zlib

    def sections(meta: dict) -> tuple[bytes, int, int, int]:
        blob = encode(Message({"w": torch.ones(2)}, meta))
        n_layout, n_meta = int.from_bytes(blob[8:12], "little"), int.from_bytes(blob[12:16], "little")
        return blob, n_layout, n_meta, (-(16 + n_layout + n_meta)) % 8  # ... and the padding after them

    blob, n_layout, n_meta, pad = next(f for f in (sections({"x": "a" * i}) for i in range(16)) if f[3] > 0)
    layout, meta = blob[16 : 16 + n_layout], blob[16 + n_layout : 16 + n_layout + n_meta]
    body = bytearray(blob[8:])
    body[8 + n_layout + n_meta] = 1  # the first byte of the padding
    with pytest.raises(MessageError, match="nonzero padding after the message header"):
        decode(b"FDM\x05" + crc32c(bytes(body)).to_bytes(4, "little") + bytes(body))
    assert decode(checked(layout, meta, blob[-8:])).tensors["w"].tolist() == [1.0, 1.0]  # (as it was)
    extra = zlib.compress(zlib.decompress(meta)) + b"extra"  # a second stream's worth of bytes after the meta's
    with pytest.raises(MessageError, match="meta is not exactly one compressed meta"):
        decode(checked(layout, extra, blob[-8:]))
    extra = zlib.compress(zlib.decompress(layout)) + b"extra"
    with pytest.raises(MessageError, match="layout is not exactly one compressed layout"):
        decode(checked(extra, meta, blob[-8:]))


def test_a_bool_is_zero_or_one():
    header, parts = read_parts(encode(Message({"b": torch.tensor([True, False, True])})))
    parts[0][""] = torch.tensor([1, 2, 0], dtype=torch.uint8).view(torch.bool)
    with pytest.raises(MessageError, match="tensor 'b': identity: a bool tensor holds the byte 2"):
        decode(write_parts(header, parts))


def test_frames_are_not_zeroed_first_yet_every_byte_is_written():
    # frames are allocated without zeroing (a few MB per message): the padding after the header, between
    # the parts and after the last one is written as zeros, whatever the memory held before
    from feddiff.compress.codecs import make_codec

    g = torch.Generator().manual_seed(4)
    m = Message({"a": torch.randn(3, 5, generator=g), "n": torch.arange(3), "b": torch.randn(7, generator=g),
                 "h": torch.randn(5, generator=g, dtype=torch.float64)}, {"round": 3})
    for codec in (make_codec("identity"), make_codec("int8"), make_codec("int4", scheme="channel")):
        first = encode(m, codec)
        for _ in range(20):  # memory of the frame's size, dirtied and freed: the allocator hands it out again
            garbage = b"\xff" * len(first)
            del garbage
            again = encode(m, codec)
            assert again == first, codec
        assert decode(first).meta == {"round": 3}


def test_a_codec_must_write_its_whole_layout():
    from feddiff.compress.codecs import Codec, CodecError

    class Short(Codec):  # a codec bug: a layout of n elements, one fewer written
        name = "short"

        def encode(self, x, generator=None):
            return {"": x.reshape(-1)[1:].contiguous()}, {}

    with pytest.raises(CodecError, match="short: part '' holds 3 elements; its layout has 4"):
        Short().encode_group([torch.ones(4)], {"": torch.zeros(4)})


def test_a_layout_is_kept_by_both_ends_and_only_by_value():
    import feddiff.compress.wire as wire
    from feddiff.compress.codecs import make_codec

    codec = make_codec("int8")
    t = {"w": torch.linspace(-1, 1, 50), "b": torch.arange(3)}
    made = wire._layout_for.cache_info()
    one, two = encode(Message(t, {"round": 1}), codec), encode(Message(t, {"round": 2}), codec)
    assert wire._layout_for.cache_info().hits == made.hits + 1  # the second message reused the first's layout
    raw = one[16 : 16 + int.from_bytes(one[8:12], "little")]
    wire._received.pop(raw, None)
    corrupt = bytearray(one)
    corrupt[-1] ^= 1
    with pytest.raises(MessageError, match="checksum"):
        decode(bytes(corrupt))
    assert raw not in wire._received  # a frame that fails a check leaves nothing behind
    assert decode(one).meta == {"round": 1} and raw in wire._received
    assert decode(two).meta == {"round": 2} and wire._checked_layout(raw) is wire._received[raw]
    assert torch.equal(decode(two).tensors["b"], t["b"])
    # the codec's settings are part of the key: changed in place, the layout follows
    codec.scheme = "channel"
    header, _ = unpack_frame(encode(Message(t), codec))
    assert header["codec_config"]["scheme"] == "channel"
    # other values in the same layout decode to themselves
    u = {"w": torch.linspace(0, 5, 50), "b": torch.arange(3) * 7}
    out = decode(encode(Message(u), make_codec("identity"))).tensors
    assert torch.equal(out["w"], u["w"]) and torch.equal(out["b"], u["b"])


def test_a_bad_layout_is_refused_every_time():
    head = {**OK, "groups": [["identity", "float32", ["a"], [[-1]]]]}
    for _ in range(2):  # (an error is not kept: the second one is checked again)
        with pytest.raises(MessageError, match="invalid shape"):
            decode(frame_with_header(head))


def test_messages_of_one_layout_from_several_threads():
    from concurrent.futures import ThreadPoolExecutor

    from feddiff.compress.codecs import make_codec

    codec = make_codec("int8")

    def one(k: int) -> bool:
        g = torch.Generator().manual_seed(k)
        t = {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g), "n": torch.arange(k, k + 4)}
        out = decode(encode(Message(t, {"k": k}), codec))
        return out.meta == {"k": k} and torch.equal(out.tensors["n"], t["n"]) and \
            all((out.tensors[n] - t[n]).abs().max() <= (t[n].max() - t[n].min()) / 255 for n in ("w", "b"))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, range(64)))


def test_a_huge_layout_is_not_kept(monkeypatch):
    import feddiff.compress.wire as wire

    monkeypatch.setattr(wire, "_KEEP_MAX_TENSORS", 3)
    blob = encode(Message({f"t{i}": torch.zeros(0) for i in range(4)}))
    raw = blob[16 : 16 + int.from_bytes(blob[8:12], "little")]
    assert len(decode(blob).tensors) == 4 and raw not in wire._received
    blob = encode(Message({f"t{i}": torch.zeros(0) for i in range(3)}))
    assert len(decode(blob).tensors) == 3 and blob[16 : 16 + int.from_bytes(blob[8:12], "little")] in wire._received
    for i in range(40):  # at most _LAYOUTS are kept
        decode(encode(Message({f"u{i}": torch.zeros(1)})))
    assert len(wire._received) == wire._LAYOUTS


def test_a_setting_changed_in_place_to_an_equal_value_of_another_type_is_a_new_layout():
    from feddiff.compress.codecs import make_codec

    codec, g = make_codec("int8", stochastic_rounding=True), torch.Generator().manual_seed(0)
    t = {"w": torch.linspace(-1, 1, 20)}
    assert decode(encode(Message(t), codec, g)).tensors["w"].shape == (20,)
    codec.stochastic_rounding = 1  # == True, and hashes alike: not the layout that says true
    with pytest.raises(MessageError, match="stochastic_rounding must be true or false"):
        decode(encode(Message(t), codec, g))
