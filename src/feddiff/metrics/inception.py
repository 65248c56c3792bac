"""InceptionV3 in its FID variant (Heusel et al. 2017), written in plain torch, weights from a local file.

This is the network pytorch-fid uses: torchvision's ``inception_v3(num_classes=1008,
aux_logits=False)`` with the ``FIDInception{A,C,E_1,E_2}`` blocks, which mimic the TensorFlow graph
the FID reference statistics were computed with (average pools that ignore the zero padding, and a
max pool in the last block's pool branch). Parameter names and shapes match pytorch-fid's weights
file ``pt_inception-2015-12-05-6726825d.pth`` key for key, so that file loads without renaming.
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` is loaded strictly into a module whose
parametrised sub-modules carry the same names and shapes (``torch_fidelity/
feature_extractor_inceptionv3.py``), so it loads here too; pytorch-fid's file is the reference.

Nothing is downloaded: :func:`load_inception` reads a file the user put on disk.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from feddiff.metrics.featurenet import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_FILE_FIDELITY,
    INCEPTION_WEIGHTS_PAGE,
    check_images,
)

INCEPTION_SIZE = 299


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, as TensorFlow's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real pixels, not counting the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions at 17x17."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Expanded filter bank at 8x8; ``pool`` is "avg" in Mixed_7b and "max" in Mixed_7c.

    The max pool in Mixed_7c reproduces the TensorFlow FID graph (pytorch-fid's FIDInceptionE_2);
    the paper has an average pool there, but the reference statistics were computed with this one.
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """The FID InceptionV3: float images in [0, 1] -> pool3 features (N, 2048) or logits (N, 1008).

    Always in eval mode: BatchNorm uses the stored running statistics, and ``train()`` is a no-op,
    so a metric wrapper cannot switch it to batch statistics by accident.
    """

    name = "inception"
    metric_label = "FID"
    num_features = 2048
    num_classes = 1008  # the 2015 TensorFlow graph's 1008 outputs (1000 classes + unused slots)
    image_size = INCEPTION_SIZE

    def __init__(self) -> None:
        super().__init__()
        # module names follow torchvision's Inception3, which is what the weights file's keys are
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.weights_id = "random-init"
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> InceptionV3FID:
        return super().train(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 1|3, H, W) -> the network's input: 3 channels, 299x299, in [-1, 1]."""
        check_images(images, (1, 3), "InceptionV3FID")
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # gray to RGB, as pytorch-fid does for gray images
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            # pytorch-fid's resize: plain bilinear, no antialiasing
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared input (N, 3, 299, 299) -> the final average pool, flattened (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):  # fmt: skip
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features (N, 2048) float32 of float images in [0, 1], any size."""
        return self.pool3(self.prepare(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 1008) for the Inception Score: pool3 @ fc.weight.T, without the bias.

        As the original Inception Score code, torch-fidelity and torchmetrics ("logits_unbiased").
        """
        return self.forward(images) @ self.fc.weight.T

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass through the network."""
        feats = self.forward(images)
        return feats, feats @ self.fc.weight.T


def _weights_help() -> str:
    return (
        f"FID needs pytorch-fid's InceptionV3 weights file {INCEPTION_WEIGHTS_FILE} (download it once "
        f"from {INCEPTION_WEIGHTS_PAGE}; torch-fidelity's {INCEPTION_WEIGHTS_FILE_FIDELITY} also works). "
        f"Nothing is downloaded at run time: put the file anywhere and set the config key "
        f"eval.inception_weights or the environment variable {INCEPTION_WEIGHTS_ENV} to its path, "
        "or use the offline 'domain' feature net (reported as FD-domain, not FID)"
    )


def resolve_inception_path(path: str | os.PathLike | None) -> Path:
    """The weights file to use: ``path`` if given, else ``$FEDDIFF_INCEPTION_WEIGHTS``."""
    chosen = path or os.environ.get(INCEPTION_WEIGHTS_ENV, "")
    if not chosen:
        raise FileNotFoundError(f"no InceptionV3 weights file configured. {_weights_help()}")
    return Path(chosen).expanduser()


def load_inception(path: str | os.PathLike | None = None) -> InceptionV3FID:
    """Build :class:`InceptionV3FID` and load its weights from a local file.

    Parameters
    ----------
    path
        The weights file (``pt_inception-2015-12-05-6726825d.pth``); ``None`` reads the path from
        the environment variable ``FEDDIFF_INCEPTION_WEIGHTS``.

    Returns
    -------
    InceptionV3FID
        In eval mode, gradients off, with ``weights_id`` set to the file's SHA-256 prefix (it keys
        cached reference features).

    Raises
    ------
    FileNotFoundError
        No path configured, or no file there; the message says which file and where to put it.
    ValueError
        The file is not a state dict, or its keys or shapes do not match the FID InceptionV3.
    """
    file = resolve_inception_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"InceptionV3 weights not found at {file}. {_weights_help()}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated download or a non-torch file: say which file
        raise ValueError(f"{file}: cannot read as a torch state dict ({type(err).__name__}: {err}). "
                         f"{_weights_help()}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a dict of tensors (a state dict), got {type(state).__name__}. "
                         f"{_weights_help()}")
    net = InceptionV3FID()
    check_state_dict(net, state, str(file))
    # num_batches_tracked is absent from older files; BatchNorm fills it in, and eval ignores it
    net.load_state_dict(state, strict=False)
    net.weights_id = _sha256_prefix(file)
    return net


def check_state_dict(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError unless ``state`` has exactly ``net``'s keys and shapes (ignoring counters)."""

    def params(d: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in d.items() if not k.endswith("num_batches_tracked")}

    want, have = params(net.state_dict()), params(state)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        if wrong:
            parts.append("shape mismatches " + ", ".join(f"{k}: file {have[k]} vs {want[k]}" for k in wrong[:4]))
        raise ValueError(f"{source} does not fit the FID InceptionV3: {'; '.join(parts)}. {_weights_help()}")


def _sha256_prefix(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
