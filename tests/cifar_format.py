"""Write a small CIFAR-100 folder in the official python pickle layout (cifar-100-python/{train,test,meta})."""
import os
import pickle

import numpy as np


def write_cifar100(root, n_train=16, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "fine_labels": [int(v) for v in rng.integers(0, 100, size=n)],
                 "coarse_labels": [int(v) for v in rng.integers(0, 20, size=n)]}
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    return str(root)
