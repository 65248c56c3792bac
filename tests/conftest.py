"""Shared fixtures: a tiny Fashion-MNIST-shaped dataset written as real IDX files, tiny configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feddiff.config import Config, config_from_dict
from feddiff.data.sources import write_idx

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Feature networks and reference statistics go to a per-session folder, never ~/.cache."""
    import os

    old = os.environ.get("FEDDIFF_CACHE")
    os.environ["FEDDIFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("FEDDIFF_CACHE", None)
    else:
        os.environ["FEDDIFF_CACHE"] = old


def synthetic_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Class c is a bright bar at a class-dependent row on a dark background, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        row = 2 + int(c) * (size - 4) // 10
        images[i, row : row + 2, 4 : size - 4] = 230
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like /usr/share/datasets/fashion-mnist, with 400 train and 80 test images."""
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n, seed in (("train", 400, 0), ("t10k", 80, 1)):
        x, y = synthetic_images(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


def tiny_config(root: Path, out: Path, **sections: dict) -> Config:
    """A 2-client, 2-round, 16 px, tiny-U-Net run over ``root``; ``sections`` override keys."""
    raw: dict = {
        "run": {"name": "t", "num_rounds": 2, "seed": 3, "out_dir": str(out), "progress": "none"},
        "data": {"root": str(root), "image_size": 16, "resize": "resize"},
        "partition": {"method": "dirichlet", "num_clients": 2, "alpha": 1.0},
        "model": {"preset": "tiny"},
        "train": {"lr": 1e-3, "batch_size": 8, "local_steps": 2},
        "eval": {"grid_size": 4, "num_inference_steps": 2, "loss_num_samples": 16},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture
def make_config(fmnist_dir: Path, tmp_path: Path):
    def make(**sections: dict) -> Config:
        return tiny_config(fmnist_dir, tmp_path / "runs", **sections)

    return make
