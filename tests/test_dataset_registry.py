"""Datasets by registry: a kind defined in a test module (tests/toy_dataset.py: reading, detection, class names)
trains through train.main, scores through validate.main and builds a cache through tools/build_cache.py, and
`--import` registers a kind from a user's file before the arguments are parsed."""
import glob
import json

import numpy as np
import pytest
import torch
import toy_dataset  # registers toy_stripes, as a user's `--import toy_dataset` would
from conftest import run_main

from engine.datasets import DATASETS, build_dataset, infer_dataset_kind
from engine.models import create_model
from engine.plugins import import_modules, import_modules_of_command_line
from engine.train_args import build_train_parser
from kdcore.errors import UserError

TOY_RUN = ["--model", "test_resnet", "--img-size", "16", "--workers", "0", "-b", "8", "--epochs", "1", "--no-aug",
           "--smoothing", "0", "--log-interval", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    return toy_dataset.write_toy_stripes(tmp_path_factory.mktemp("data") / "stripes")


def test_the_kind_is_detected_and_read_with_its_statistics(toy_folder):
    assert infer_dataset_kind(toy_folder) == "toy_stripes"
    assert list(DATASETS)[:4] == ["cifar100", "imagenet", "fashion_mnist", "synthetic"]  # built-ins detect first
    val = build_dataset("toy_stripes", toy_folder, "val", None)
    assert len(val) == 12 and val.num_classes == 3
    assert val.mean == (0.4,) * 3 and val.std == (0.3,) * 3  # attached from the registration
    assert "toy_stripes" in build_train_parser({})._option_string_actions["--dataset"].choices


def test_a_toy_dataset_trains_validates_and_caches(toy_folder, tmp_path):
    trained = run_main("train.py", toy_folder, *TOY_RUN, "--output", tmp_path / "runs", "--experiment", "toy")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = tmp_path / "runs" / "toy"
    assert "Data: toy_stripes from" in (run / "log.txt").read_text()
    scored = run_main("validate.py", toy_folder, "--checkpoint", run / "best.pth.tar", "--workers", "0",
                      "--device", "cpu")
    assert scored.returncode == 0, scored.stderr[-3000:]
    record = json.loads(scored.stdout.strip().splitlines()[-1])
    assert record["dataset"] == "toy_stripes" and record["num_samples"] == 12

    weights = tmp_path / "source.pth"
    torch.manual_seed(0)
    torch.save(create_model("test_resnet", num_classes=3).state_dict(), weights)
    cache = tmp_path / "cache"
    built = run_main("tools/build_cache.py", toy_folder, "--source", "test_resnet", "--weights", weights,
                     "--output", cache, "--img-size", "16", "-b", "8", "-j", "0", "--device", "cpu")
    assert built.returncode == 0, built.stderr[-3000:]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["dataset"]["class_names"] == list(toy_dataset.CLASS_NAMES)
    assert meta["dataset"]["size"] == 24
    assert np.load(glob.glob(str(cache / "logits*"))[0], mmap_mode="r").shape == (1, 24, 3)


def test_import_flag_registers_a_kind_from_a_file_before_parsing(tmp_path):
    module = tmp_path / "my_user_datasets.py"
    module.write_text("from engine.datasets import register_dataset\n"
                      "from engine.datasets.synthetic import read_synthetic\n"
                      "register_dataset('my_user_set', mean=(0.5,) * 3, std=(0.2,) * 3)(read_synthetic)\n")
    argv = ["--import", str(module), "--dataset", "my_user_set"]
    import_modules_of_command_line(argv)
    try:
        args = build_train_parser({}).parse_args(argv)
        assert args.dataset == "my_user_set" and args.import_modules == [str(module)]
        import_modules(args.import_modules)  # a second import of the same file is harmless
    finally:
        DATASETS.pop("my_user_set")
    with pytest.raises(UserError, match="no module named 'no_such_user_module'"):
        import_modules(["no_such_user_module"])
    with pytest.raises(UserError, match="no such file"):
        import_modules([str(tmp_path / "missing.py")])


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered already"):
        toy_dataset.register_dataset("cifar100", mean=(0.5,), std=(0.5,))(toy_dataset.read_toy_stripes)
    assert DATASETS["cifar100"].read.__module__ == "engine.datasets.cifar100"  # the first registration stands
