"""The idx reader, on Fashion-MNIST itself when the Debian package is present and on files we write."""
import gzip
import struct

import numpy as np
import pytest

from engine.datasets.fashion_mnist import read_fashion_mnist, read_idx_gz
from kdcore.errors import UserError


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(folder, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_reader_round_trips_written_files(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(read_idx_gz(tmp_path / "x.gz"), images)


def test_truncated_file_is_an_error(tmp_path):
    header = struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 100)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(header + bytes(10))
    with pytest.raises(UserError, match="truncated"):
        read_idx_gz(tmp_path / "bad.gz")


def test_dataset_from_a_data_path(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    train, val = read_fashion_mnist(str(tmp_path), "train"), read_fashion_mnist(str(tmp_path), "val")
    assert (len(train), len(val), train.num_classes) == (12, 5, 10)
    image, label = train[3]
    assert image.size == (28, 28) and image.mode == "RGB" and label == 3


def test_real_fashion_mnist_counts_shapes_labels(fashion_mnist):
    train, val = read_fashion_mnist("", "train"), read_fashion_mnist("", "val")
    assert (len(train), len(val)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert set(np.unique(train.labels)) == set(range(10)) and set(np.unique(val.labels)) == set(range(10))
    assert np.bincount(train.labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert 0.28 < train.images.mean() / 255 < 0.29  # its known mean, 0.2860


def test_missing_data_names_both_ways_to_get_it(tmp_path, monkeypatch):
    import engine.datasets.fashion_mnist as datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "no_system_copy"))
    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download", offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as info:
        read_fashion_mnist(str(tmp_path / "empty"), "train")
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and "download" in message
