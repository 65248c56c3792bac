import pytest
import torch

from crc32c import crc32c

from feddiff.compress.wire import Message, MessageError, decode, encode, pack_frame, unpack_frame


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
    # a well-framed message whose index lies about a shape
    header, storage = unpack_frame(encode(Message({"w": torch.zeros(4)})))
    header["index"][0][1] = [5]
    with pytest.raises(MessageError, match=r"tensor 'w'.*header says (torch\.)?float32\[5\]"):
        decode(pack_frame(header, storage))


def frame_with_header(head: dict) -> bytes:
    """A frame with a valid checksum around any header (no data section)."""
    import json
    import zlib

    raw = zlib.compress(json.dumps(head).encode())
    body = len(raw).to_bytes(4, "little") + raw
    return b"FDM\x03" + crc32c(body).to_bytes(4, "little") + body


@pytest.mark.parametrize("head, match", [
    ([1, 2], "not an object with a storage table"),
    ({"storage": [], "index": []}, "not an object with a storage table"),
    ({"storage": {}, "index": [5], "meta": {}, "codec": "identity", "codec_config": {}}, r"malformed index entry 5"),
    ({"storage": {}, "index": [], "meta": [1], "codec": "identity", "codec_config": {}}, "meta and codec_config"),
])
def test_well_framed_but_malformed_headers_rejected(head, match):
    with pytest.raises(MessageError, match=match):
        decode(frame_with_header(head))


def test_identity_rejects_params_and_extra_parts():
    header, storage = unpack_frame(encode(Message({"w": torch.zeros(4)})))
    header["index"][0][4] = {"junk": 1}
    with pytest.raises(MessageError, match=r"tensor 'w': identity: unexpected codec parameters"):
        decode(pack_frame(header, storage))
    header["index"][0][4], header["index"][0][5] = {}, ["", "extra"]
    with pytest.raises(MessageError, match=r"tensor 'w':.*unexpected \['extra'\]"):
        decode(pack_frame(header, {**storage, "w#extra": torch.zeros(1)}))


def test_storage_table_out_of_bounds_rejected():
    header, storage = unpack_frame(encode(Message({"w": torch.zeros(4)})))
    blob = pack_frame(header, {"w#": torch.zeros(4)})
    # rebuild the frame by hand with a storage table that claims more bytes than the frame holds
    import json
    import zlib

    n = int.from_bytes(blob[8:12], "little")
    head = json.loads(zlib.decompress(blob[12 : 12 + n]))
    head["storage"]["w#"][3] = 64
    new_head = zlib.compress(json.dumps(head).encode())
    body = len(new_head).to_bytes(4, "little") + new_head
    body += bytes((-(12 + len(new_head))) % 8) + bytes(16)
    bad = b"FDM\x03" + crc32c(body).to_bytes(4, "little") + body
    with pytest.raises(MessageError, match="do not fit float32"):
        decode(bad)


def test_header_bomb_refused():
    import zlib

    head = zlib.compress(b"[" * (80 << 20))
    body = len(head).to_bytes(4, "little") + head
    with pytest.raises(MessageError, match="complete compressed header"):
        decode(b"FDM\x03" + crc32c(body).to_bytes(4, "little") + body)


def test_bytes_are_deterministic():
    m = msg()
    assert len({encode(m) for _ in range(10)}) == 1


def test_empty_and_scalar_tensors():
    m = Message({"e": torch.zeros(0, 3), "s": torch.tensor(2.5), "b": torch.tensor([True, False])})
    out = decode(encode(m)).tensors
    assert out["e"].shape == (0, 3) and out["s"].item() == 2.5 and out["b"].tolist() == [True, False]


def test_rejects_hash_in_names():
    with pytest.raises(MessageError, match="may not contain"):
        encode(Message({"a#b": torch.zeros(1)}))
