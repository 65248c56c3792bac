import pytest
import torch

from feddiff.compress.wire import Message, MessageError, decode, encode


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
    # A well-framed message whose header lies about a shape: rebuild the frame around a bad body.
    import json
    import zlib

    from safetensors.torch import save

    body = save({"w#": torch.zeros(4)}, metadata={
        "codec": "identity", "codec_config": "{}", "meta": "{}",
        "index": json.dumps([["w", [5], "float32", "identity", {}, [""]]]),
    })
    blob = b"FDM\x01" + zlib.crc32(body).to_bytes(4, "little") + body
    with pytest.raises(MessageError, match=r"tensor 'w'.*header says (torch\.)?float32\[5\]"):
        decode(blob)


def test_rejects_hash_in_names():
    with pytest.raises(MessageError, match="may not contain"):
        encode(Message({"a#b": torch.zeros(1)}))
