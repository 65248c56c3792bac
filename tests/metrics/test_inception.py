"""InceptionV3FID: structure checked against the published architecture; loading and its errors.

The real weights file is not on the test machine, so the key names and shapes are checked against
a table written out here from torchvision's Inception3 / pytorch-fid's FID blocks, and a saved
state dict of our own is round-tripped through ``load_inception``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from feddiff.metrics.featurenet import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE
from feddiff.metrics.inception import InceptionV3FID, _tf_avg_pool, load_inception

# (name, in, out, kernel) of every BasicConv2d; kernel (kh, kw). From torchvision's Inception3.
STEM = [("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)), ("Conv2d_2b_3x3", 32, 64, (3, 3)),
        ("Conv2d_3b_1x1", 64, 80, (1, 1)), ("Conv2d_4a_3x3", 80, 192, (3, 3))]  # fmt: skip


def block_a(c: int, pool: int) -> list:
    return [("branch1x1", c, 64, (1, 1)), ("branch5x5_1", c, 48, (1, 1)), ("branch5x5_2", 48, 64, (5, 5)),
            ("branch3x3dbl_1", c, 64, (1, 1)), ("branch3x3dbl_2", 64, 96, (3, 3)),
            ("branch3x3dbl_3", 96, 96, (3, 3)), ("branch_pool", c, pool, (1, 1))]  # fmt: skip


def block_b(c: int) -> list:
    return [("branch3x3", c, 384, (3, 3)), ("branch3x3dbl_1", c, 64, (1, 1)),
            ("branch3x3dbl_2", 64, 96, (3, 3)), ("branch3x3dbl_3", 96, 96, (3, 3))]  # fmt: skip


def block_c(c: int, c7: int) -> list:
    return [("branch1x1", c, 192, (1, 1)), ("branch7x7_1", c, c7, (1, 1)), ("branch7x7_2", c7, c7, (1, 7)),
            ("branch7x7_3", c7, 192, (7, 1)), ("branch7x7dbl_1", c, c7, (1, 1)),
            ("branch7x7dbl_2", c7, c7, (7, 1)), ("branch7x7dbl_3", c7, c7, (1, 7)),
            ("branch7x7dbl_4", c7, c7, (7, 1)), ("branch7x7dbl_5", c7, 192, (1, 7)),
            ("branch_pool", c, 192, (1, 1))]  # fmt: skip


def block_d(c: int) -> list:
    return [("branch3x3_1", c, 192, (1, 1)), ("branch3x3_2", 192, 320, (3, 3)),
            ("branch7x7x3_1", c, 192, (1, 1)), ("branch7x7x3_2", 192, 192, (1, 7)),
            ("branch7x7x3_3", 192, 192, (7, 1)), ("branch7x7x3_4", 192, 192, (3, 3))]  # fmt: skip


def block_e(c: int) -> list:
    return [("branch1x1", c, 320, (1, 1)), ("branch3x3_1", c, 384, (1, 1)), ("branch3x3_2a", 384, 384, (1, 3)),
            ("branch3x3_2b", 384, 384, (3, 1)), ("branch3x3dbl_1", c, 448, (1, 1)),
            ("branch3x3dbl_2", 448, 384, (3, 3)), ("branch3x3dbl_3a", 384, 384, (1, 3)),
            ("branch3x3dbl_3b", 384, 384, (3, 1)), ("branch_pool", c, 192, (1, 1))]  # fmt: skip


BLOCKS = {
    "Mixed_5b": block_a(192, 32), "Mixed_5c": block_a(256, 64), "Mixed_5d": block_a(288, 64),
    "Mixed_6a": block_b(288), "Mixed_6b": block_c(768, 128), "Mixed_6c": block_c(768, 160),
    "Mixed_6d": block_c(768, 160), "Mixed_6e": block_c(768, 192), "Mixed_7a": block_d(768),
    "Mixed_7b": block_e(1280), "Mixed_7c": block_e(2048),
}  # fmt: skip


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of pytorch-fid's state dict (without BatchNorm's num_batches_tracked) and its shape."""
    convs = [(n, i, o, k) for n, i, o, k in STEM]
    convs += [(f"{b}.{n}", i, o, k) for b, spec in BLOCKS.items() for n, i, o, k in spec]
    out: dict[str, tuple[int, ...]] = {}
    for name, c_in, c_out, (kh, kw) in convs:
        out[f"{name}.conv.weight"] = (c_out, c_in, kh, kw)
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{p}"] = (c_out,)
    out["fc.weight"], out["fc.bias"] = (1008, 2048), (1008,)
    return out


@pytest.fixture(scope="module")
def net() -> InceptionV3FID:
    torch.manual_seed(0)
    return InceptionV3FID()


def test_parameter_count(net: InceptionV3FID) -> None:
    # torchvision documents inception_v3 (1000 classes, with the aux head) at 27,161,264 parameters.
    # The aux head is conv 768->128 1x1 (98,304 + BN 256) + conv 128->768 5x5 (2,457,600 + BN 1,536)
    # + fc 768->1000 (769,000) = 3,326,696, so the trunk + fc(2048->1000) is 23,834,568. The FID
    # graph has 1008 outputs: 8 more rows of 2048 weights + 1 bias = 16,392 -> 23,850,960.
    assert 27_161_264 - (98_304 + 256 + 2_457_600 + 1_536 + 769_000) + 8 * 2049 == 23_850_960
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    # and the table below, written from the architecture, gives the same count (BN stats are buffers)
    table = expected_shapes()
    assert sum(math.prod(s) for k, s in table.items() if not k.endswith(("running_mean", "running_var"))) == 23_850_960


def test_state_dict_matches_pytorch_fid_keys(net: InceptionV3FID) -> None:
    got = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    want = expected_shapes()
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: got[k] for k in want if got[k] != want[k]} == {}
    # spot checks, written out by hand
    assert got["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert got["Conv2d_1a_3x3.bn.running_mean"] == (32,)
    assert got["Mixed_5b.branch1x1.conv.weight"] == (64, 192, 1, 1)
    assert got["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert got["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert got["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert got["fc.weight"] == (1008, 2048) and got["fc.bias"] == (1008,)
    assert all(m.eps == 0.001 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_fid_block_variants(net: InceptionV3FID) -> None:
    assert net.Mixed_7b.pool == "avg" and net.Mixed_7c.pool == "max"
    # TensorFlow's average pool ignores the padding: a constant map stays constant at the border
    assert torch.equal(_tf_avg_pool(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))


def test_prepare_resizes_repeats_gray_and_scales(net: InceptionV3FID) -> None:
    gray = torch.rand(2, 1, 28, 28)
    x = net.prepare(gray)
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 1
    ref = F.interpolate(gray.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(x, ref)
    torch.testing.assert_close(net.prepare(gray.repeat(1, 3, 1, 1)), x)


def test_features_and_logits_shapes(net: InceptionV3FID) -> None:
    feats, logits = net.features_and_logits(torch.rand(2, 3, 32, 32))  # ~1-3 s on 2 CPU cores
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert logits.shape == (2, 1008)
    # the Inception Score's logits leave out the fc bias, as the original code and torchmetrics do
    torch.testing.assert_close(logits, feats @ net.fc.weight.T)
    assert net.fc.bias.abs().max() > 0 and not torch.allclose(logits, net.fc(feats))
    assert net.num_features == 2048 and net.metric_label == "FID"


def test_always_eval_and_no_grad(net: InceptionV3FID) -> None:
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())


def test_bad_inputs(net: InceptionV3FID) -> None:
    with pytest.raises(ValueError, match="channels"):
        net.prepare(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="float images"):
        net.prepare(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.fixture(scope="module")
def weights_file(net: InceptionV3FID, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our module's state dict with non-default values, saved like pytorch-fid's file (~95 MB)."""
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.rand(v.shape, generator=g) if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / INCEPTION_WEIGHTS_FILE
    torch.save(state, path)
    return path


def test_load_round_trip_and_env_var(weights_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = torch.load(weights_file, weights_only=True)
    loaded = load_inception(weights_file)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    assert len(loaded.weights_id) == 16 and not loaded.training
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(weights_file))
    assert torch.equal(load_inception().fc.weight, saved["fc.weight"])


def test_load_without_batch_counters(weights_file: Path, tmp_path: Path) -> None:
    # older files (and possibly the published one) have no num_batches_tracked entries
    state = {k: v for k, v in torch.load(weights_file, weights_only=True).items() if "num_batches" not in k}
    torch.save(state, tmp_path / "old.pth")
    assert torch.equal(load_inception(tmp_path / "old.pth").Mixed_7c.branch_pool.bn.running_var,
                       state["Mixed_7c.branch_pool.bn.running_var"])


def test_missing_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    for path in (tmp_path / "nope.pth", None):
        with pytest.raises(FileNotFoundError) as err:
            load_inception(path)
        msg = str(err.value)
        assert INCEPTION_WEIGHTS_FILE in msg and "eval.inception_weights" in msg and INCEPTION_WEIGHTS_ENV in msg
        assert "pytorch-fid" in msg


def test_mismatched_file_errors(tmp_path: Path) -> None:
    bad = {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1008), "AuxLogits.fc.weight": torch.zeros(1)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_inception(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing keys" in msg and "Conv2d_1a_3x3" in msg
    assert "unexpected keys" in msg and "AuxLogits.fc.weight" in msg
    assert "fc.weight: file (1000, 2048) vs (1008, 2048)" in msg and INCEPTION_WEIGHTS_FILE in msg
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_inception(tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_inception(tmp_path / "list.pth")
