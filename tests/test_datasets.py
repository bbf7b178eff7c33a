from types import SimpleNamespace

import numpy as np
import pytest
from cifar_format import write_cifar100
from PIL import Image
from test_fashion_mnist import write_fake_fashion_mnist

from engine.datasets import build_dataset, infer_dataset_kind
from engine.datasets.synthetic import make_synthetic
from kdcore.errors import UserError

ARGS = SimpleNamespace(dataset_download=False, synthetic_train_size=40, synthetic_val_size=20, num_classes=None,
                       synthetic_seed=0)


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=2):
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(root / split / name / f"{i}.png")
    return root


def test_infers_cifar100_from_either_level(tmp_path):
    root = write_cifar100(tmp_path / "c", n_train=10, n_test=4)
    assert infer_dataset_kind(root) == "cifar100"
    assert infer_dataset_kind(str(tmp_path / "c" / "cifar-100-python")) == "cifar100"
    train = build_dataset("cifar100", root, "train", ARGS)
    image, label = train[0]
    assert (len(train), train.num_classes, image.size, image.mode) == (10, 100, (32, 32), "RGB")
    assert 0 <= label < 100 and train.mean == (0.5071, 0.4865, 0.4409)


def test_cifar_pixel_layout_is_channel_major(tmp_path):
    """CIFAR rows hold 1024 red, then green, then blue values."""
    import pickle
    root = write_cifar100(tmp_path / "c", n_train=1, n_test=1)
    with open(tmp_path / "c" / "cifar-100-python" / "train", "rb") as f:
        row = pickle.load(f)["data"][0]
    image = np.asarray(build_dataset("cifar100", root, "train", ARGS)[0][0])
    assert np.array_equal(image[..., 0].ravel(), row[:1024]) and np.array_equal(image[..., 2].ravel(), row[2048:])


def test_infers_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "inet")
    assert infer_dataset_kind(str(root)) == "imagenet"
    val = build_dataset("imagenet", str(root), "val", ARGS)
    assert (len(val), val.num_classes) == (6, 3)


def test_infers_fashion_mnist_folder(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    assert infer_dataset_kind(str(tmp_path)) == "fashion_mnist"


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_synthetic("train", 40, 4), make_synthetic("train", 40, 4)
    assert np.array_equal(a.images, b.images) and np.bincount(a.labels).tolist() == [10] * 4
    assert not np.array_equal(make_synthetic("val", 40, 4).images, a.images)


def test_imagenet_without_val_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="has no val/ folder"):
        build_dataset("imagenet", str(tmp_path), "val", ARGS)


def test_dataset_labels_of_every_kind(tmp_path):
    from engine.datasets import dataset_labels
    synthetic = make_synthetic("train", 40, 4)
    assert dataset_labels(synthetic).tolist() == [synthetic[i][1] for i in range(40)]
    folder = build_dataset("imagenet", str(write_image_folder(tmp_path / "inet")), "train", ARGS)
    assert dataset_labels(folder).tolist() == [0, 0, 1, 1, 2, 2]
