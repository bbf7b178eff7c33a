"""Bad input that used to slip through (silently, or as a traceback): each case is one `error:` line naming the
flag, key or file, exit code 2, and no run folder left behind. Run in-process (train.main)."""
import os

import pytest
import torch
from conftest import SMALL_RUN, run_main
from PIL import Image


def _config(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return ["-c", path]


def _empty(tmp_path, name="empty.pth"):
    path = tmp_path / name
    path.write_bytes(b"")
    return path


def _image_folder_with_an_empty_class(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "dog").mkdir(parents=True)  # no images
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "a.png")
    return root


def _a_file(tmp_path):
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    return path


CASES = {
    "lr nan": (lambda t: ["--lr", "nan"], "--lr"),
    "ema decay 1.5": (lambda t: ["--model-ema", "--model-ema-decay", "1.5"], "--model-ema-decay"),
    "img-size 0": (lambda t: ["--img-size", "0"], "--img-size"),
    "img-size 7, patch-16 ViT": (lambda t: ["--img-size", "7", "--model", "deit_tiny_patch16_224"], "--img-size 7"),
    "drop-path 2": (lambda t: ["--drop-path", "2"], "--drop-path"),
    "smoothing 1.5": (lambda t: ["--smoothing", "1.5"], "--smoothing"),
    "two mean values": (lambda t: ["--mean", "0.5", "0.5"], "--mean"),
    "yaml batch_size 8.5": (lambda t: _config(t, "batch_size: 8.5\n"), "batch_size"),
    "yaml lr fast": (lambda t: _config(t, "lr: fast\n"), "lr: 'fast'"),
    "empty teacher file": (lambda t: ["--distiller", "kd", "--teacher", "test_resnet", "--teacher-pretrained",
                                      _empty(t)], "empty.pth"),
    "empty resume file": (lambda t: ["--resume", _empty(t, "last.pth.tar")], "last.pth.tar"),
    "class folder without images": (lambda t: [_image_folder_with_an_empty_class(t), "--dataset", "imagenet"],
                                    "dog"),
    "output is a file": (lambda t: ["--output", _a_file(t)], "--output"),
    "device cuda without a GPU": (lambda t: ["--device", "cuda"], "--device cuda"),
    "fitnet stage 7": (lambda t: ["--distiller", "fitnet", "--fitnet-stage", "7"], "--fitnet-stage"),
    "ofa stage 7": (lambda t: ["--distiller", "ofa", "--ofa-stage", "7"], "--ofa-stage"),
    "unknown distiller": (lambda t: ["--distiller", "nonexistent"], "--distiller"),
    "resume auto without experiment": (lambda t: ["--resume", "auto"], "--experiment"),
    "unknown stop signal": (lambda t: ["--stop-signals", "SIGNOPE"], "--stop-signals"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(tmp_path, case):
    if case == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    make, named = CASES[case]
    output = tmp_path / "runs"
    argv = [*SMALL_RUN, "--output", output, *make(tmp_path)]
    if case == "output is a file":
        argv = [*SMALL_RUN, *make(tmp_path)]
    if case == "class folder without images":
        argv = [a for a in argv if a != "synthetic"]  # SMALL_RUN's --dataset now takes the case's value
        argv.remove("--dataset")
    result = run_main("train.py", *argv)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and named in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert not output.exists() or os.listdir(output) == []


def test_a_folder_with_an_older_run_is_refused_and_left_unchanged(tmp_path):
    """No last.pth.tar, but an older best.pth.tar and summary.csv: a fresh run must not overwrite them."""
    folder = tmp_path / "runs" / "old"
    folder.mkdir(parents=True)
    (folder / "best.pth.tar").write_bytes(b"older best")
    (folder / "summary.csv").write_text("epoch,eval_top1\n0,12.5\n")
    result = run_main("train.py", *SMALL_RUN, "--output", tmp_path / "runs", "--experiment", "old")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "--resume auto" in errors[0], result.stderr
    assert sorted(os.listdir(folder)) == ["best.pth.tar", "summary.csv"]
    assert (folder / "best.pth.tar").read_bytes() == b"older best"
    assert (folder / "summary.csv").read_text() == "epoch,eval_top1\n0,12.5\n"


def test_crd_k_beyond_the_dataset_warns(tmp_path, saved_weights):
    """Decided: a warning, not a refusal (negatives are drawn with replacement, as in the official code, so the
    loss is defined; they repeat)."""
    result = run_main("train.py", *SMALL_RUN, "--output", tmp_path / "runs", "--epochs", "1", "--distiller", "crd",
                      "--teacher", "test_resnet", "--teacher-pretrained", saved_weights("test_resnet"),
                      "--crd-k", "100000", "--experiment", "crd")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: --crd-k 100000" in result.stderr
