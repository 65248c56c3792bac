"""Feature nets by name; the domain classifier: shapes, deterministic training, caching, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from feddiff.metrics.featurenet import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE
from feddiff.metrics.features import (
    FEATURE_NETS,
    DomainNet,
    build_domain_net,
    load_feature_net,
    train_domain_classifier,
)


def test_registry_and_unknown_name(tmp_path: Path) -> None:
    assert sorted(FEATURE_NETS) == ["domain", "inception"]
    with pytest.raises(ValueError, match=r"unknown feature net 'vgg'.*\['domain', 'inception'\]"):
        load_feature_net("vgg", dataset="fashion-mnist", cache_dir=tmp_path)


def test_inception_by_name_needs_a_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        load_feature_net("inception", dataset="fashion-mnist", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_feature_net("inception", dataset="x", cache_dir=tmp_path, inception_weights=tmp_path / "missing.pth")


def test_domain_net_shapes_any_size_and_channels() -> None:
    net = build_domain_net(1, 28, 10, seed=0).eval()
    assert (net.name, net.metric_label, net.num_features, net.num_classes) == ("domain", "FD-domain", 128, 10)
    for shape in ((3, 1, 28, 28), (2, 1, 32, 32), (2, 3, 16, 16)):
        feats, logits = net.features_and_logits(torch.rand(shape))
        assert feats.shape == (shape[0], 128) and feats.dtype == torch.float32
        assert logits.shape == (shape[0], 10)
        assert net(torch.rand(shape)).shape == feats.shape
    rgb = build_domain_net(3, 32, 4, seed=0).eval()
    assert rgb(torch.rand(2, 1, 28, 28)).shape == (2, 128) and rgb.logits(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    # a gray image given as RGB gives the same features as the gray image
    gray = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(net(gray.repeat(1, 3, 1, 1)), net(gray), atol=1e-5, rtol=1e-5)


def test_domain_net_rejects_bad_inputs() -> None:
    net = build_domain_net(1, 28, 10)
    with pytest.raises(ValueError, match="float images"):
        net(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        net(torch.rand(1, 2, 28, 28))
    with pytest.raises(ValueError, match="in_channels=2"):
        DomainNet(2, 28, 10)


def test_seeded_initialisation() -> None:
    a, b, c = build_domain_net(1, 28, 10, 0), build_domain_net(1, 28, 10, 0), build_domain_net(1, 28, 10, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


@pytest.fixture(scope="module")
def trained(fmnist_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, train_domain_classifier("fashion-mnist", str(fmnist_dir), cache, seed=0, epochs=1, batch_size=64)


def test_training_writes_cache_with_settings(trained, fmnist_dir: Path) -> None:
    cache, result = trained
    assert not result.cached and result.path.is_file() and result.path.parent == cache / "features"
    meta = json.loads(result.path.with_suffix(".json").read_text())
    for key in ("dataset", "seed", "epochs", "arch_version", "image_size", "test_accuracy", "data_sha256", "hash"):
        assert key in meta
    assert (meta["dataset"], meta["seed"], meta["epochs"], meta["image_size"]) == ("fashion-mnist", 0, 1, 28)
    assert result.path.name == f"domain-fashion-mnist-{meta['hash']}.safetensors"
    assert 0 <= result.test_accuracy <= 1 and meta["test_accuracy"] == result.test_accuracy


def test_second_call_loads_from_cache(trained, fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, first = trained

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a cached net exists")

    monkeypatch.setattr(torch.optim, "Adam", no_training)
    again = train_domain_classifier("fashion-mnist", str(fmnist_dir), cache, seed=0, epochs=1, batch_size=64)
    assert again.cached and again.path == first.path and again.test_accuracy == first.test_accuracy


def test_same_seed_same_weights_other_seed_differs(trained, fmnist_dir: Path, tmp_path: Path) -> None:
    _, first = trained
    same = train_domain_classifier("fashion-mnist", str(fmnist_dir), tmp_path / "a", seed=0, epochs=1, batch_size=64)
    other = train_domain_classifier("fashion-mnist", str(fmnist_dir), tmp_path / "b", seed=1, epochs=1, batch_size=64)
    w0, w1, w2 = (load_file(str(r.path)) for r in (first, same, other))
    assert same.path.name == first.path.name
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert other.path.name != first.path.name and not torch.equal(w0["fc1.weight"], w2["fc1.weight"])


def test_load_feature_net_domain(trained, fmnist_dir: Path) -> None:
    cache, result = trained
    net = load_feature_net("domain", dataset="fashion-mnist", cache_dir=cache, root=str(fmnist_dir), seed=0)
    assert isinstance(net, DomainNet) and not net.training and net.metric_label == "FD-domain"
    assert net.weights_id in result.path.name
    saved = load_file(str(result.path))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 128)


def test_missing_domain_cache_says_how_to_train(fmnist_dir: Path, tmp_path: Path, trained) -> None:
    with pytest.raises(FileNotFoundError, match="feddiff features train --dataset fashion-mnist"):
        load_feature_net("domain", dataset="fashion-mnist", cache_dir=tmp_path, root=str(fmnist_dir))
    cache, _ = trained
    with pytest.raises(FileNotFoundError, match=r"seed 7"):  # cached for seed 0 only
        load_feature_net("domain", dataset="fashion-mnist", cache_dir=cache, root=str(fmnist_dir), seed=7)


def test_rgb_image_folder_without_test_split(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            arr = np.clip(rng.normal(colour, 20, size=(12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    result = train_domain_classifier("image-folder", str(tmp_path / "data"), tmp_path / "cache", epochs=2, batch_size=8)
    meta = json.loads(result.path.with_suffix(".json").read_text())
    assert (meta["in_channels"], meta["image_size"], meta["num_classes"]) == (3, 12, 2)
    assert meta["test_split"] == "train-holdout-10%"
    net = load_feature_net("domain", dataset="image-folder", cache_dir=tmp_path / "cache", root=str(tmp_path / "data"))
    assert net(torch.rand(3, 3, 32, 32)).shape == (3, 128)


# ----------------------------------------------------------------------------------------------
# Module structure: no import cycle between the feature-net modules

_NET_MODULES = ("feddiff.metrics.featurenet", "feddiff.metrics.features", "feddiff.metrics.inception")


def _metrics_imports(module: str) -> dict[str, bool]:
    """The feddiff.metrics modules ``module`` imports anywhere in its source -> whether at module level."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} not found"
    tree = ast.parse(Path(spec.origin).read_text())
    top = {id(node) for node in tree.body}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from feddiff.metrics import features` names the module in the alias
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in _NET_MODULES and name != module:
                found[name] = found.get(name, False) or id(node) in top
    return found


def test_feature_net_modules_have_no_import_cycle() -> None:
    graph = {m: _metrics_imports(m) for m in _NET_MODULES}
    assert "feddiff.metrics.features" not in graph["feddiff.metrics.inception"]
    assert graph["feddiff.metrics.featurenet"] == {}  # the shared module depends on neither
    # every remaining import is at module level (no lazy import working around a cycle) and there is no cycle
    assert all(at_top for deps in graph.values() for at_top in deps.values()), graph
    for a in _NET_MODULES:
        for b in graph[a]:
            assert a not in graph[b], f"{a} and {b} import each other"


@pytest.mark.parametrize("order", [("inception", "features"), ("features", "inception")])
def test_feature_net_modules_import_in_either_order(order: tuple[str, str]) -> None:
    import subprocess
    import sys

    first, second = (f"feddiff.metrics.{m}" for m in order)
    code = (f"import {first}, {second}, feddiff.metrics.featurenet as fn\n"
            "from feddiff.metrics import features, inception\n"
            "assert features.check_images is inception.check_images is fn.check_images\n"
            "assert features.load_inception is inception.load_inception\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
