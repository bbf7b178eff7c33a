"""Each bad input (unknown YAML key, model or distiller, missing or mismatched teacher checkpoint, dataset not
found, NaN loss, ...) gets one clear message naming the input and the fix, a non-zero exit, and nothing
half-written."""
import os

import pytest
import torch
from conftest import SMALL_RUN, run_main


def assert_clean_failure(result, message, output_dir):
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not os.path.exists(output_dir) or os.listdir(output_dir) == [], "no run folder may be left behind"


def train(tmp_path, *args):
    return run_main("train.py", *SMALL_RUN, "--output", tmp_path / "runs", *args)


def test_unknown_yaml_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 1\nbatchsize: 8\n")
    result = train(tmp_path, "-c", cfg)
    assert_clean_failure(result, "unknown key(s) batchsize", tmp_path / "runs")


def test_unknown_model(tmp_path):
    assert_clean_failure(train(tmp_path, "--model", "resnet_18"), "unknown model 'resnet_18'", tmp_path / "runs")


def test_unknown_distiller(tmp_path):
    result = train(tmp_path, "--distiller", "rsdd")
    assert result.returncode == 2 and "invalid choice: 'rsdd'" in result.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_missing_teacher_checkpoint(tmp_path):
    result = train(tmp_path, "--distiller", "rsd", "--teacher", "resnet18", "--teacher-pretrained",
                   tmp_path / "missing.pth")
    assert_clean_failure(result, "checkpoint not found", tmp_path / "runs")


def test_teacher_without_checkpoint(tmp_path):
    result = train(tmp_path, "--distiller", "kd", "--teacher", "resnet18")
    assert_clean_failure(result, "needs --teacher-pretrained", tmp_path / "runs")


def test_teacher_class_count_mismatch_names_both_sizes(tmp_path, saved_weights):
    ckpt = saved_weights("resnet18", num_classes=100)
    result = train(tmp_path, "--distiller", "rsd", "--teacher", "resnet18", "--teacher-pretrained", ckpt)
    assert_clean_failure(result, "has a 100-class head but 'resnet18' was built with 10 classes", tmp_path / "runs")


def test_teacher_architecture_mismatch(tmp_path, saved_weights):
    ckpt = saved_weights("resnet34", num_classes=10)
    result = train(tmp_path, "--distiller", "rsd", "--teacher", "resnet18", "--teacher-pretrained", ckpt)
    assert_clean_failure(result, "does not match architecture 'resnet18'", tmp_path / "runs")


def test_teacher_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"not a zip file at all")
    result = train(tmp_path, "--distiller", "kd", "--teacher", "resnet18", "--teacher-pretrained", bad)
    assert_clean_failure(result, "cannot read teacher checkpoint", tmp_path / "runs")


def test_dataset_not_found(tmp_path):
    result = run_main("train.py", tmp_path / "no_such_dir", "--output", tmp_path / "runs")
    assert_clean_failure(result, "is not a folder", tmp_path / "runs")


def test_cifar_folder_without_files(tmp_path):
    (tmp_path / "cifar").mkdir()
    result = run_main("train.py", tmp_path / "cifar", "--dataset", "cifar100", "--output", tmp_path / "runs")
    assert_clean_failure(result, "CIFAR-100 not found", tmp_path / "runs")


def test_unrecognisable_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_main("train.py", tmp_path / "data", "--output", tmp_path / "runs")
    assert_clean_failure(result, "cannot tell the dataset kind", tmp_path / "runs")


def test_resume_from_a_non_training_file(tmp_path, saved_weights):
    result = train(tmp_path, "--resume", saved_weights("resnet18"))
    assert_clean_failure(result, "is not a training checkpoint", tmp_path / "runs")


def test_nan_loss_before_the_first_checkpoint_leaves_no_folder(tmp_path):
    """The run folder it made holds nothing to resume, so it is removed (and the same --experiment stays free)."""
    result = train(tmp_path, "--lr", "1e12", "--warmup-epochs", "0", "--epochs", "2", "--experiment", "nan")
    assert result.returncode == 2
    assert "the loss became nan" in result.stderr or "the loss became inf" in result.stderr
    assert os.listdir(tmp_path / "runs") == []


def test_existing_run_folder_is_not_overwritten(tmp_path):
    first = train(tmp_path, "--epochs", "1", "--experiment", "same")
    assert first.returncode == 0, first.stderr
    before = os.path.getmtime(tmp_path / "runs" / "same" / "last.pth.tar")
    second = train(tmp_path, "--epochs", "1", "--experiment", "same")
    assert second.returncode == 2 and "already holds files of a run" in second.stderr
    assert os.path.getmtime(tmp_path / "runs" / "same" / "last.pth.tar") == before
    assert torch.load(tmp_path / "runs" / "same" / "last.pth.tar", weights_only=True)["epoch"] == 0


def test_relative_output_folder_and_outputs(tmp_path):
    """A relative --output (as in the configs) resolves against the working directory; every file is there."""
    result = run_main("train.py", *SMALL_RUN, "--epochs", "2", "--output", "runs", "--experiment", "rel",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    files = set(os.listdir(tmp_path / "runs" / "rel"))
    assert {"args.yaml", "log.txt", "summary.csv", "last.pth.tar", "best.pth.tar", "student_last.pth",
            "student_best.pth"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert not any(f.endswith(".tmp") for f in files)
    assert len((tmp_path / "runs" / "rel" / "summary.csv").read_text().splitlines()) == 3  # header + 2 epochs


def test_sync_bn_on_cpu(tmp_path):
    assert_clean_failure(train(tmp_path, "--sync-bn"), "--sync-bn needs CUDA", tmp_path / "runs")


def test_optimizer_settings_rejected(tmp_path):
    result = train(tmp_path, "--opt", "sgd", "--momentum", "0")
    assert_clean_failure(result, "optimizer settings rejected", tmp_path / "runs")


@pytest.mark.parametrize("flags,message", [
    (["-b", "0"], "--batch-size must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--mixup", "0.8", "-b", "15"], "--mixup/--cutmix need an even per-process batch size"),
])
def test_refused_settings(tmp_path, flags, message):
    """Defects 8 and 13: these ended in a raw traceback (ZeroDivision/ValueError, or Mixup's assert mid-epoch)."""
    assert_clean_failure(train(tmp_path, *flags), message, tmp_path / "runs")


def test_corrupt_image_names_its_path(tmp_path, monkeypatch):
    """Defect 13: a corrupt file in an ImageNet-style folder gave a PIL traceback mid-epoch."""
    import gc

    from PIL import Image
    # The error leaves the loader's iterator in a reference cycle (the traceback's frames); when gc collects it,
    # multiprocessing has already closed the queue that would tell the worker to stop, so torch waits this long
    # for the worker before it terminates it (5 s by default; a subprocess exits without waiting at all).
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1, raising=False)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "inet" / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / "inet" / split / name / f"{i}.png")
    bad = tmp_path / "inet" / "train" / "b" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header, then garbage
    result = run_main("train.py", tmp_path / "inet", "--img-size", "32", "--workers", "1", "-b", "8", "--epochs", "1",
                      "--output", tmp_path / "runs", "--experiment", "bad")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot read image {str(bad)!r}" in result.stderr and "replace or delete that file" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert os.listdir(tmp_path / "runs") == []  # failed before its first checkpoint: the folder is removed
    gc.collect()  # the worker goes now, while the shorter wait is in place


def test_missing_fashion_mnist_path_does_not_fall_back(tmp_path):
    """Defect 10: a data path that does not exist silently used the system copy instead."""
    result = run_main("train.py", tmp_path / "nowhere", "--dataset", "fashion_mnist", "--output", tmp_path / "runs")
    assert_clean_failure(result, f"Fashion-MNIST data path {str(tmp_path / 'nowhere')!r} does not exist",
                         tmp_path / "runs")
