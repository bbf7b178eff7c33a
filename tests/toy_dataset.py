"""A dataset kind defined outside the repo's packages, the way a user adds one: one decorated reader in one module.

`toy_stripes` folders hold `toy_stripes.npz` (train/val images as uint8 (N, 16, 16, 3), labels, class names).
Importing this module registers the kind; nothing else in the repo names it.
"""
import os

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from engine.datasets import register_dataset

FILE = "toy_stripes.npz"
CLASS_NAMES = ("horizontal stripes", "vertical stripes", "checkerboard")


class StripeImages(Dataset):
    """(PIL image, label) pairs from arrays, with what the registry asks of a dataset: num_classes, labels, source."""

    def __init__(self, images, labels, source):
        self.images, self.labels, self.source = images, labels, source
        self.num_classes, self.transform = len(CLASS_NAMES), None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])
        return (image if self.transform is None else self.transform(image)), int(self.labels[index])


def write_toy_stripes(folder, train_size=24, val_size=12, seed=0):
    """A toy_stripes folder: each class a fixed 16x16 pattern plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.indices((16, 16))
    patterns = np.stack([(grid[0] // 2) % 2, (grid[1] // 2) % 2, (grid[0] // 4 + grid[1] // 4) % 2]) * 200.0
    arrays = {}
    for split, size in (("train", train_size), ("val", val_size)):
        labels = np.arange(size) % len(CLASS_NAMES)
        noise = rng.normal(0, 20, size=(size, 16, 16, 3))
        arrays[f"{split}_images"] = np.clip(patterns[labels][..., None] + noise, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, FILE), class_names=np.array(CLASS_NAMES), **arrays)
    return str(folder)


def has_toy_file(root):
    return os.path.isfile(os.path.join(root, FILE))


def toy_class_names(root, dataset):
    return [str(name) for name in np.load(os.path.join(root, FILE))["class_names"]]


@register_dataset("toy_stripes", mean=(0.4,) * 3, std=(0.3,) * 3, detect=has_toy_file, class_names=toy_class_names,
                  layout=f"a {FILE} file")
def read_toy_stripes(root, split, args):
    arrays = np.load(os.path.join(root, FILE))
    return StripeImages(arrays[f"{split}_images"], arrays[f"{split}_labels"], root)
