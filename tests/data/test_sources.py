import pickle

import numpy as np
import pytest
import torch

from feddiff.data.sources import DatasetError, load_dataset, load_fashion_mnist, read_idx, write_idx
from feddiff.data.transforms import fit_to_size, make_grid, random_flip, to_model_range, to_uint8


def test_idx_roundtrip_raw_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        write_idx(tmp_path / name, a)
        assert np.array_equal(read_idx(tmp_path / name), a)


def test_idx_truncated_names_path(tmp_path):
    p = tmp_path / "bad-idx3-ubyte"
    write_idx(p, np.zeros((4, 5, 5), np.uint8))
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="bad-idx3-ubyte.*truncated"):
        read_idx(p)


def test_idx_bad_magic_names_path(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    write_idx(p, np.zeros((4, 28, 28), np.uint8))
    p.write_bytes(b"\x00\x00\x0d\x03" + p.read_bytes()[4:])  # 0x0D: float data, not unsigned bytes
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: not an unsigned-byte IDX file \(bad magic 00000d03\)"):
        read_idx(p)


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8), r"images \(5, 28, 28\) and labels \(4,\) do not match"),
    (np.zeros((4, 32, 32), np.uint8), np.zeros(4, np.uint8), r"images are 32x32 pixels; Fashion-MNIST's are 28x28"),
])
def test_fashion_mnist_count_and_size_mismatch(tmp_path, images, labels, match):
    for split, n in (("train", images), ("t10k", images)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", n)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DatasetError, match=match):
        load_fashion_mnist(str(tmp_path), "train")


def test_fashion_mnist_reader(fmnist_dir):
    d = load_fashion_mnist(str(fmnist_dir), "train")
    assert d.images.shape == (400, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels.shape == (400,) and d.num_classes == 10 and d.class_names[9] == "Ankle boot"


def test_missing_folder_names_path_and_files(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere.*train-images-idx3-ubyte\[\.gz\].*dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"), "train")


def test_missing_file_names_it(tmp_path, fmnist_dir):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes((fmnist_dir / "train-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(DatasetError, match="missing .*train-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", str(tmp_path), "train")


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
    batch[b"labels"] = [int(x) for x in batch[b"labels"]]
    path.write_bytes(pickle.dumps(batch))
    return batch


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(folder / f"data_batch_{i}", 6, i) for i in range(1, 6)]
    _cifar_batch(folder / "test_batch", 4, 9)
    d = load_dataset("cifar10", str(tmp_path), "train")
    assert d.images.shape == (30, 3, 32, 32)
    assert np.array_equal(d.images[6].numpy().reshape(-1), batches[1][b"data"][0])
    assert d.labels[6] == batches[1][b"labels"][0]
    assert len(load_dataset("cifar10", str(tmp_path), "test")) == 4


def _cifar_python_folder(tmp_path, override):
    """Train batches 1..5 of 4 images each; ``override`` replaces keys of data_batch_3."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        batch = _cifar_batch(folder / f"data_batch_{i}", 4, i)
        if i == 3:
            batch.update(override)
            (folder / "data_batch_3").write_bytes(pickle.dumps(batch))
    return folder


@pytest.mark.parametrize("override, match", [
    ({b"data": np.zeros((4, 3000), np.uint8)}, r"data_batch_3: data is uint8 of shape \(4, 3000\); expected N >= 1"),
    ({b"data": np.zeros(4 * 3072, np.uint8)}, r"data_batch_3: data is uint8 of shape \(12288,\)"),
    ({b"data": np.full((4, 3072), 300, np.int64)}, r"data_batch_3: data is int64 .*3x32x32 uint8"),
    ({b"labels": [1, 2, 3]}, r"data_batch_3: labels are int64 of shape \(3,\); expected 4 integers"),
    ({b"labels": [1, 2, 10, 3]}, r"data_batch_3: label 10 at record 2 is outside 0\.\.9"),
    ({b"labels": [1, -1, 0, 3]}, r"data_batch_3: label -1 at record 1 is outside 0\.\.9"),
], ids=["short-rows", "flat", "not-bytes", "labels-short", "label-10", "label-neg"])  # fmt: skip
def test_cifar10_python_malformed_batch_names_file(tmp_path, override, match):
    _cifar_python_folder(tmp_path, override)
    with pytest.raises(DatasetError, match=match):
        load_dataset("cifar10", str(tmp_path), "train")


def test_cifar10_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batch.*builtins.print"):
        load_dataset("cifar10", str(tmp_path), "train")


def test_cifar10_binary_and_missing(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.zeros((2, 3073), np.uint8)
        rec[:, 0] = [3, 7]
        rec[1, 1:] = 255
        rec.tofile(folder / name)
    d = load_dataset("cifar10", str(tmp_path), "train")
    assert d.images.shape == (10, 3, 32, 32) and d.labels[:2].tolist() == [3, 7] and d.images[1].min() == 255
    with pytest.raises(DatasetError, match="cifar-10-batches-py/ .*data_batch_1"):
        load_dataset("cifar10", str(tmp_path / "empty"), "train")


def test_cifar10_binary_malformed_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)]:
        np.zeros((2, 3073), np.uint8).tofile(folder / name)
    rec = np.zeros((3, 3073), np.uint8)
    rec[:, 0] = [1, 12, 2]
    rec.tofile(folder / "data_batch_4.bin")
    with pytest.raises(DatasetError, match=r"data_batch_4\.bin: label 12 at record 1 is outside 0\.\.9"):
        load_dataset("cifar10", str(tmp_path), "train")
    (folder / "data_batch_4.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"data_batch_4\.bin: size 0 is not a positive multiple of 3073"):
        load_dataset("cifar10", str(tmp_path), "train")


def test_fashion_mnist_label_out_of_range_names_file(tmp_path, fmnist_dir):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes((fmnist_dir / name).read_bytes())
    labels = read_idx(tmp_path / "train-labels-idx1-ubyte.gz").copy()
    labels[7] = 10
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: label 10 at record 7 is outside 0\.\.9"):
        load_dataset("fashion-mnist", str(tmp_path), "train")


def _image_classes(root, arrays_by_class):
    from PIL import Image

    for c, arrays in arrays_by_class.items():
        (root / c).mkdir(parents=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(root / c / f"{i}.png")


def test_image_folder_mode_from_all_files(tmp_path):
    gray, rgb = np.full((8, 8), 90, np.uint8), np.full((8, 8, 3), (10, 20, 30), np.uint8)
    # the first file (a/0.png) is grayscale, the rest RGB: the dataset is RGB
    _image_classes(tmp_path / "mixed", {"a": [gray, rgb], "b": [rgb]})
    d = load_dataset("image-folder", str(tmp_path / "mixed"), "train")
    assert d.images.shape == (3, 3, 8, 8)
    assert d.images[0, :, 0, 0].tolist() == [90, 90, 90] and d.images[1, :, 0, 0].tolist() == [10, 20, 30]
    _image_classes(tmp_path / "gray", {"a": [gray, gray], "b": [gray]})
    d = load_dataset("image-folder", str(tmp_path / "gray"), "train")
    assert d.images.shape == (3, 1, 8, 8) and int(d.images[2, 0, 0, 0]) == 90


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, value in (("cats", 10), ("dogs", 200)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    d = load_dataset("image-folder", str(tmp_path), "train")
    assert d.class_names == ["cats", "dogs"] and d.images.shape == (6, 3, 8, 8)
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1] and int(d.images[3, 0, 0, 0]) == 200


def test_unknown_dataset_lists_valid():
    with pytest.raises(ValueError, match="choose from .*'cifar10'.*'fashion-mnist'"):
        load_dataset("mnist", "", "train")


def test_fit_to_size_pad_centres_the_image():
    x = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    y = fit_to_size(x, 32, "pad")
    assert y.shape == (1, 1, 32, 32)
    assert y[0, 0, 2:30, 2:30].min() == 255 and y[0, 0, :2].max() == 0 and y[0, 0, :, 30:].max() == 0
    with pytest.raises(ValueError, match="cannot shrink 28x28 images to 16"):
        fit_to_size(x, 16, "pad")
    assert fit_to_size(x, 16, "resize").shape == (1, 1, 16, 16)
    assert fit_to_size(torch.zeros((2, 3, 20, 30), dtype=torch.uint8), 8, "center-crop").shape == (2, 3, 8, 8)


def test_range_conversions_and_flip():
    x = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)
    y = to_model_range(x)
    assert y.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert torch.equal(to_uint8(y), x)
    g = torch.Generator().manual_seed(0)
    imgs = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 1, 1, 4).repeat(50, 1, 1, 1)
    out = random_flip(imgs, g)
    flipped = (out != imgs).flatten(1).any(1)
    assert 20 < int(flipped.sum()) < 80  # about half
    assert torch.equal(out[flipped], imgs[flipped].flip(-1))


def test_make_grid_layout():
    imgs = torch.stack([torch.full((1, 2, 2), i, dtype=torch.uint8) for i in range(1, 5)])
    g = make_grid(imgs, nrow=2, pad=1)
    assert g.shape == (1, 7, 7)
    assert g[0, 1, 1] == 1 and g[0, 1, 4] == 2 and g[0, 4, 1] == 3 and g[0, 4, 4] == 4 and g[0, 0, 0] == 0


def test_celeba_official_layout_labels_crop_and_resize(tmp_path):
    from PIL import Image

    (tmp_path / "img_align_celeba").mkdir()
    names = ["000001.jpg", "000002.jpg", "000003.jpg"]
    for i, n in enumerate(names):
        a = np.zeros((218, 178, 3), np.uint8)
        a[20:198] = 60 * (i + 1)  # the central 178x178 square is uniform
        Image.fromarray(a).save(tmp_path / "img_align_celeba" / n, quality=100)
    attrs = "3\n5_o_Clock_Shadow Male Young\n" + "\n".join(
        f"{n} -1 {m} {y}" for n, m, y in zip(names, ("1", "-1", "1"), ("1", "1", "-1")))
    (tmp_path / "list_attr_celeba.txt").write_text(attrs + "\n")
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 2\n")
    d = load_dataset("celeba", str(tmp_path), "train", 16)
    assert d.images.shape == (2, 3, 16, 16)
    assert d.labels.tolist() == [3, 1]  # 2*Male + Young: male-young, female-young
    assert abs(int(d.images[1].float().mean()) - 120) <= 2  # the crop kept the uniform centre
    assert load_dataset("celeba", str(tmp_path), "test", 16).labels.tolist() == [2]
    (tmp_path / "list_attr_celeba.txt").unlink()
    with pytest.raises(DatasetError, match="list_attr_celeba.txt"):
        load_dataset("celeba", str(tmp_path), "train")


def _celeba_files(root, header="5_o_Clock_Shadow Male Young", rows=("000001.jpg -1 1 1",),
                  partition="000001.jpg 0\n"):
    (root / "img_align_celeba").mkdir()
    (root / "list_attr_celeba.txt").write_text(f"{len(rows)}\n{header}\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text(partition)


def test_celeba_attribute_file_without_male_column(tmp_path):
    _celeba_files(tmp_path, header="5_o_Clock_Shadow Smiling Young")
    with pytest.raises(DatasetError, match=r"list_attr_celeba\.txt: no Male column in the header"):
        load_dataset("celeba", str(tmp_path), "train")


def test_celeba_attribute_row_with_wrong_column_count(tmp_path):
    _celeba_files(tmp_path, rows=("000001.jpg -1 1 1", "000002.jpg -1 1"))
    with pytest.raises(DatasetError, match=r"list_attr_celeba\.txt:4: 3 columns, expected the file name and 3"):
        load_dataset("celeba", str(tmp_path), "train")


@pytest.mark.parametrize("bad", ["000002.jpg 3", "000002.jpg", "000002.jpg 0 extra"])
def test_celeba_bad_partition_line_names_file_and_line(tmp_path, bad):
    _celeba_files(tmp_path, partition=f"000001.jpg 0\n\n{bad}\n")
    with pytest.raises(DatasetError, match=r"list_eval_partition\.txt:3: expected '<file> <0\|1\|2>'"):
        load_dataset("celeba", str(tmp_path), "train")
