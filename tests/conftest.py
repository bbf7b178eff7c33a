import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def random_demo_teacher(tmp_path_factory):
    """A random-init convnext_demo_32 checkpoint: the machinery under test needs no trained weights."""
    from engine.models import create_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "convnext_demo_32.pth"
    torch.save(create_model("convnext_demo_32", num_classes=10).state_dict(), path)
    return str(path)


def run_cli(script, *args, env=None, timeout=600, cwd=REPO):
    """Run one of the repo's CLIs in a subprocess; returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def _have_fashion_mnist():
    from engine.datasets import FASHION_MNIST_SYSTEM_DIR
    return os.path.isfile(os.path.join(FASHION_MNIST_SYSTEM_DIR, "train-images-idx3-ubyte.gz"))


@pytest.fixture(scope="session")
def fashion_mnist():
    """For tests on the real Fashion-MNIST (Debian package dataset-fashion-mnist): skipped where it is not
    installed, but a failure in CI (CI=true), where `bash test.sh` installs it, so it can never go untested.
    Session-scoped, so module-scoped fixtures built on the data (caches, folders) can ask for it too."""
    if not _have_fashion_mnist():
        message = "needs Fashion-MNIST: apt-get install dataset-fashion-mnist (bash test.sh does it as root)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


SMALL_RUN = ["--dataset", "synthetic", "--img-size", "32", "--workers", "0", "-b", "16",
             "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--log-interval", "1"]


@pytest.fixture
def saved_weights(tmp_path):
    """Save a freshly built model's state dict: save_weights(name, num_classes, img_size) -> path."""
    from engine.models import create_model

    def save(name, num_classes=10, img_size=32, wrap=None, filename=None):
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes, img_size=img_size)
        state = model.state_dict()
        path = tmp_path / (filename or f"{name}_{num_classes}.pth")
        torch.save({wrap: state} if wrap else state, path)
        return str(path)

    return save
