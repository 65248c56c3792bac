"""Dataset readers for local files in their official formats; nothing is downloaded.

Each reader returns an :class:`ImageData` of uint8 images (N, C, H, W) and int64 labels.
Readers of fixed-size formats return the native size; readers of image files (CelebA, image
folders) take ``size`` and resize each image as they read it, so a large folder never sits in
memory at full resolution (CelebA's train split at 178x178 would be 15 GB). A missing or
malformed file raises :class:`DatasetError` naming the path and the files expected there.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# PIL modes with one luminance channel (alpha dropped); any other mode is read as RGB
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class DatasetError(FileNotFoundError):
    """A dataset file is missing or malformed; the message names the path and what is expected."""


@dataclass(frozen=True)
class ImageData:
    """Images of one split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.shape == (self.images.shape[0],), (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files (optionally gzipped), as shipped by Debian's dataset-fashion-mnist


def _find(root: Path, stem: str, dataset: str, expected: list[str]) -> Path:
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.is_file():
            return cand
    hint = " (install Debian's dataset-fashion-mnist package)" if dataset == "fashion-mnist" else ""
    raise DatasetError(
        f"{dataset}: missing {root / stem}[.gz]; expected in {root}: {', '.join(expected)}{hint}"
    )


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DatasetError(
            f"{path}: label {labels[bad[0]].item()} at record {bad[0].item()} is outside 0..{num_classes - 1} "
            f"({bad.size} such labels)"
        )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic 0x0000TTDD, DD big-endian uint32 dims, data."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DatasetError(f"{path}: not a valid gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise DatasetError(
            f"{path}: IDX dims {dims} need {header + size} bytes, file has {len(raw)} (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: str, split: str, size: int | None = None) -> ImageData:
    base = Path(data_root("fashion-mnist", root))
    prefix = {"train": "train", "test": "t10k"}[split]
    expected = [f"{p}-{k}-idx{n}-ubyte[.gz]" for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))]
    if not base.is_dir():
        raise DatasetError(
            f"fashion-mnist: folder {base} not found; expected {', '.join(expected)} there "
            "(install Debian's dataset-fashion-mnist package, or set data.root)"
        )
    images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte", "fashion-mnist", expected))
    labels_path = _find(base, f"{prefix}-labels-idx1-ubyte", "fashion-mnist", expected)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(
            f"fashion-mnist in {base}: images {images.shape} and labels {labels.shape} do not match"
        )
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"fashion-mnist in {base}: images are {images.shape[1]}x{images.shape[2]} pixels; "
                           "Fashion-MNIST's are 28x28 (is this another dataset's file?)")
    _check_labels(labels_path, labels, len(FASHION_MNIST_CLASSES))
    return ImageData(
        "fashion-mnist", split, torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES,
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10: the "python version" (pickled batches) or the "binary version"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches without executing anything but numpy array reconstruction."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }  # fmt: skip

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _cifar_python(folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        path = folder / f
        if not path.is_file():
            raise DatasetError(f"cifar10: missing {path}; expected data_batch_1..5 and test_batch in {folder}")
        try:
            with path.open("rb") as fh:
                batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
            data, labels = batch[b"data"], batch[b"labels"]
            data, labels = np.asarray(data), np.asarray(labels)
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: not a CIFAR-10 python batch ({err})") from None
        if (data.ndim != 2 or data.shape[0] == 0 or data.shape[1] != 3072
                or not np.issubdtype(data.dtype, np.integer)
                or (data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255))):
            raise DatasetError(
                f"{path}: data is {data.dtype} of shape {data.shape}; expected N >= 1 rows of 3072 "
                "bytes (3x32x32 uint8 images)"
            )
        if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"{path}: labels are {labels.dtype} of shape {labels.shape}; expected {len(data)} "
                "integers, one per data row"
            )
        _check_labels(path, labels, len(CIFAR10_CLASSES))
        xs.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar_binary(folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        path = folder / f
        if not path.is_file():
            raise DatasetError(f"cifar10: missing {path}; expected data_batch_1..5.bin and test_batch.bin in {folder}")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise DatasetError(
                f"{path}: size {raw.size} is not a positive multiple of 3073-byte records "
                "(1 label byte + 3x32x32 image bytes)"
            )
        rec = raw.reshape(-1, 3073)
        _check_labels(path, rec[:, 0], len(CIFAR10_CLASSES))
        ys.append(rec[:, 0].astype(np.int64))
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(root: str, split: str, size: int | None = None) -> ImageData:
    base = Path(data_root("cifar10", root))
    py_files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for folder in (base, base / "cifar-10-batches-py", base / "cifar-10-batches-bin"):
        if (folder / py_files[0]).is_file():
            x, y = _cifar_python(folder, py_files)
            break
        if (folder / f"{py_files[0]}.bin").is_file():
            x, y = _cifar_binary(folder, [f"{f}.bin" for f in py_files])
            break
    else:
        raise DatasetError(
            f"cifar10: no batches found under {base}; expected cifar-10-batches-py/ (data_batch_1..5, "
            "test_batch) or cifar-10-batches-bin/ (the same names with .bin), as extracted from the "
            "official archives; set data.root to their folder"
        )
    return ImageData("cifar10", split, torch.from_numpy(x.copy()), torch.from_numpy(y), CIFAR10_CLASSES)


# ----------------------------------------------------------------------------------------------
# Image folders: root/<class>/*.png (and root/train, root/test when present); CelebA


def _read_image(path: Path, mode: str, crop: int | None = None, size: int | None = None) -> np.ndarray:
    """(C, H, W) uint8; optionally the central ``crop`` square, then bilinear (antialiased) ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if crop is not None:
                left, top = (im.width - crop) // 2, (im.height - crop) // 2
                im = im.crop((left, top, left + crop, top + crop))
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _image_mode(path: Path) -> str:
    """The PIL mode of an image file, from its header (the pixels are not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from None


def load_image_folder(root: str, split: str, size: int | None = None) -> ImageData:
    if not root:
        raise DatasetError("image-folder: set data.root to a folder of <class>/<image> files")
    base = Path(root)
    folder = base / split if (base / "train").is_dir() else base
    if not (base / "train").is_dir() and split == "test":
        raise DatasetError(f"image-folder: {base} has no test/ subfolder; expected {base}/test/<class>/*.png")
    if not folder.is_dir():
        raise DatasetError(f"image-folder: folder {folder} not found; expected {folder}/<class>/<image>")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"image-folder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}/<class>/")
    # one grayscale file in an RGB folder must not turn the whole dataset gray
    mode = "L" if all(_image_mode(p) in GRAY_MODES for p, _ in files) else "RGB"
    arrays = [_read_image(p, mode, size=size) for p, _ in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DatasetError(f"image-folder: images in {folder} differ in size {sorted(shapes)[:3]}; resize them first")
    x = torch.from_numpy(np.stack(arrays))
    y = torch.tensor([i for _, i in files], dtype=torch.int64)
    return ImageData("image-folder", split, x, y, classes)


def load_celeba(root: str, split: str, size: int | None = None) -> ImageData:
    """CelebA aligned crops, labelled with FedPhD's 4 pseudo-classes 2*Male + Young.

    Expects ``img_align_celeba/``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` in root.
    Images are center-cropped to 178x178 (de Goede, Diff-Pruning), then resized to ``size`` as read.
    """
    base = Path(data_root("celeba", root))
    need = [base / "img_align_celeba", base / "list_attr_celeba.txt", base / "list_eval_partition.txt"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise DatasetError(f"celeba: missing {', '.join(missing)}; expected the official aligned release in {base}")
    part = {}
    for lineno, line in enumerate(need[2].read_text().split("\n"), 1):
        cols = line.split()
        if not cols:
            continue
        if len(cols) != 2 or cols[1] not in ("0", "1", "2"):
            raise DatasetError(f"{need[2]}:{lineno}: expected '<file> <0|1|2>', got {line.strip()[:80]!r}")
        part[cols[0]] = cols[1]
    lines = need[1].read_text().split("\n")
    header = lines[1].split() if len(lines) > 1 else []
    absent = [a for a in ("Male", "Young") if a not in header]
    if absent:
        raise DatasetError(
            f"{need[1]}: no {' or '.join(absent)} column in the header (line 2); expected the official "
            "attribute list: a count line, then the 40 attribute names, then '<file> <+-1 x 40>' rows"
        )
    male, young = header.index("Male"), header.index("Young")
    wanted = {"train": "0", "test": "2"}[split]
    names, labels = [], []
    for lineno, line in enumerate(lines[2:], 3):
        cols = line.split()
        if cols and len(cols) != 1 + len(header):
            raise DatasetError(
                f"{need[1]}:{lineno}: {len(cols)} columns, expected the file name and {len(header)} attributes"
            )
        if cols and part.get(cols[0]) == wanted:
            names.append(cols[0])
            labels.append(2 * (cols[1 + male] == "1") + (cols[1 + young] == "1"))
    if not names:
        raise DatasetError(f"celeba: {need[2]} lists no {split} images")
    x = torch.from_numpy(np.stack([_read_image(need[0] / n, "RGB", crop=178, size=size) for n in names]))
    classes = ["female-old", "female-young", "male-old", "male-young"]
    return ImageData("celeba", split, x, torch.tensor(labels, dtype=torch.int64), classes)


Reader = Callable[[str, str, int | None], ImageData]
DATASETS: dict[str, Reader] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "celeba": load_celeba,
    "image-folder": load_image_folder,
}


DEFAULT_ROOTS = {"fashion-mnist": FASHION_MNIST_DIR, "cifar10": "data/cifar10", "celeba": "data/celeba"}


def data_root(name: str, root: str) -> str:
    """The folder a dataset is read from: ``root``, else the reader's default (image-folder has none)."""
    return root or DEFAULT_ROOTS.get(name, "")


def load_dataset(name: str, root: str, split: str, size: int | None = None) -> ImageData:
    """Read one split (``train`` or ``test``) of a registered dataset.

    ``size`` lets readers of image files resize while reading (others ignore it).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose from ['test', 'train']")
    return DATASETS[name](root, split, size)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzipped when the name ends in .gz); used by tests and tools."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    buf = io.BytesIO()
    buf.write(bytes([0, 0, 0x08, arr.ndim]))
    buf.write(struct.pack(f">{arr.ndim}I", *arr.shape))
    buf.write(arr.tobytes())
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
