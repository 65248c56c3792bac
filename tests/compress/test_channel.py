"""Weights vs delta encoding and error feedback, at the channel level (no training)."""

import pytest
import torch

from feddiff.compress.channel import LinkSpec, decode_message, encode_message
from feddiff.compress.codecs import make_codec
from feddiff.compress.wire import Message, MessageError


def test_delta_roundtrip_identity_is_close():
    ref = {"w": torch.randn(100)}
    new = {"w": ref["w"] + 0.01 * torch.randn(100), "n": torch.tensor(3)}
    blob, res = encode_message(Message(new, {"x": 1}), LinkSpec(mode="delta"), ref)
    out = decode_message(blob, ref)
    assert res is None and out.meta == {"x": 1}
    assert torch.allclose(out.tensors["w"], new["w"], atol=1e-6) and out.tensors["n"].item() == 3


def test_delta_without_reference_falls_back_to_weights_and_receiver_checks():
    new = {"w": torch.randn(10)}
    blob, _ = encode_message(Message(new), LinkSpec(mode="delta"), None)
    assert torch.equal(decode_message(blob).tensors["w"], new["w"])
    blob, _ = encode_message(Message(new), LinkSpec(mode="delta"), {"w": torch.zeros(10)})
    with pytest.raises(MessageError, match="no reference"):
        decode_message(blob, None)


def test_int8_delta_error_is_relative_to_the_update_not_the_weights():
    g = torch.Generator().manual_seed(0)
    ref = {"w": 10 * torch.randn(4096, generator=g)}
    new = {"w": ref["w"] + 1e-3 * torch.randn(4096, generator=g)}
    spec_w, spec_d = LinkSpec(make_codec("int8")), LinkSpec(make_codec("int8"), mode="delta")
    err_w = (decode_message(encode_message(Message(new), spec_w)[0]).tensors["w"] - new["w"]).abs().max()
    err_d = (decode_message(encode_message(Message(new), spec_d, ref)[0], ref).tensors["w"] - new["w"]).abs().max()
    assert err_d < err_w / 1000


def test_error_feedback_bounds_accumulated_error():
    """A client sends 40 small updates with int4; the server's running sum drifts without EF."""
    g = torch.Generator().manual_seed(0)
    updates = [0.01 * torch.randn(2000, generator=g) + 0.002 for _ in range(40)]
    errors = {}
    for ef in (False, True):
        spec = LinkSpec(make_codec("int4"), mode="delta", error_feedback=ef)
        ref = {"w": torch.zeros(2000)}
        true, recon, residual = torch.zeros(2000), torch.zeros(2000), None
        for u in updates:
            true += u
            blob, residual = encode_message(Message({"w": ref["w"] + u}), spec, ref, residual)
            recon += decode_message(blob, ref).tensors["w"] - ref["w"]
        errors[ef] = (recon - true).abs().mean().item()
    assert errors[True] < errors[False] / 3, errors


def test_error_feedback_needs_delta():
    with pytest.raises(ValueError, match="error_feedback needs mode='delta'"):
        LinkSpec(make_codec("int8"), mode="weights", error_feedback=True)


def test_delta_falls_back_per_tensor_when_shapes_change_and_drops_stale_residuals():
    # after structured pruning a reference or residual of the old shape must never be applied
    ref = {"w": torch.randn(8), "v": torch.randn(4)}
    new = {"w": ref["w"] + 0.5, "v": torch.randn(2), "x": torch.randn(3)}  # v shrank, x is new
    spec = LinkSpec(make_codec("int8"), mode="delta", error_feedback=True)
    stale = {"w": torch.zeros(8), "v": torch.ones(4)}
    blob, residual = encode_message(Message(new), spec, ref, stale)
    out = decode_message(blob, ref)
    assert set(residual) == {"w"}  # only the tensor that travelled as a delta keeps a residual
    assert torch.allclose(out.tensors["w"], new["w"], atol=0.01)
    assert torch.allclose(out.tensors["v"], new["v"], atol=0.02) and out.tensors["x"].shape == (3,)
    # a receiver whose reference has another shape refuses a delta instead of broadcasting it
    blob, _ = encode_message(Message({"w": torch.randn(8)}), LinkSpec(mode="delta"), {"w": torch.zeros(8)})
    with pytest.raises(MessageError, match="shape"):
        decode_message(blob, {"w": torch.zeros(2, 4)})


def test_client_link_drops_residuals_whose_shape_changed():
    from feddiff.compress.link import ClientLink, LinkSpecs

    link = ClientLink(LinkSpecs(up=LinkSpec(make_codec("int8"), mode="delta", error_feedback=True)), seed=0)
    tensors = {"ef/w": torch.ones(4), "ef/other": torch.ones(2)}
    link.send(Message({"w": torch.randn(2)}), tensors, {"w": torch.zeros(3)}, 0, "client0")
    assert "ef/w" not in tensors and "ef/other" in tensors  # stale one gone, one for another tensor kept
