"""RichKD on the real Fashion-MNIST at 32 px on CPU (issue 11's acceptance): every mode (L, F, LF) trains two
steps for a CNN and a DeiT student with a cached and with a live second source, and a killed, resumed run ends
with the weights and CRD banks of an uninterrupted one.

A fixed class-balanced subset of the training set (--train-subset) keeps it cheap; tools/build_cache.py builds
the cache on the same subset, so the run's identity check must accept it (and refuse another subset's). The
teacher (ConvNeXt) and the second source (a CIFAR ResNet: another family) are random-init checkpoints saved here:
the mechanics need no trained weights, and the tests do not wait on the shipped teacher. Validation reads the
first 64 images of the test split (the training files are the real ones), so the CLI runs' per-epoch
evaluation stays short.
"""
import os

import pytest
import runs
import torch
from test_fashion_mnist import write_idx

import tools.build_cache as build_cache_tool
from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.datasets.fashion_mnist import FASHION_MNIST_FILES, FASHION_MNIST_SYSTEM_DIR, read_idx_gz
from engine.loop import train_step
from engine.models import create_model
from engine.run import build_run
from engine.train_args import build_train_parser
from kdcore.errors import UserError

SUBSET, BATCH = 160, 16  # 10 steps an epoch for the killed-and-resumed run
VAL_IMAGES = 64
# the source is the demo's (tools/richkd_demo.sh); resnet10t is the cheapest BatchNorm CNN student at 32 px
TEACHER, SOURCE = "convnext_demo_32", "cifar_resnet8x4"
STUDENTS = {"cnn": "resnet10t", "deit": "deit_demo_32"}
LIVE_SOURCE_INPUT = ["--richkd-source-mean", "0.4", "0.4", "0.4", "--richkd-source-std", "0.3", "0.3", "0.3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, fashion_mnist):
    """Fashion-MNIST's own training files (linked) and the first VAL_IMAGES images of its test split."""
    folder = tmp_path_factory.mktemp("fashion_mnist")
    for name in FASHION_MNIST_FILES["train"]:
        (folder / name).symlink_to(os.path.join(FASHION_MNIST_SYSTEM_DIR, name))
    for name in FASHION_MNIST_FILES["val"]:
        write_idx(folder / name, read_idx_gz(os.path.join(FASHION_MNIST_SYSTEM_DIR, name))[:VAL_IMAGES])
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{model name: path of a random-init 10-class, 32 px checkpoint} for the teacher and the second source."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for name in (TEACHER, SOURCE):
        torch.manual_seed(0)
        paths[name] = str(folder / f"{name}.pth")
        torch.save(create_model(name, num_classes=10, img_size=32).state_dict(), paths[name])
    return paths


def subset_flags(data_dir, seed=0):
    return [data_dir, "--dataset", "fashion_mnist", "--train-subset", str(SUBSET), "--train-subset-seed", str(seed)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_dir, checkpoints):
    """The second source's logits and embeddings over the training subset, written by tools/build_cache.py."""
    args = build_cache_tool.build_parser().parse_args([
        *subset_flags(data_dir), "--img-size", "32", "-b", "64", "-j", "0", "--device", "cpu", "--source", SOURCE,
        "--weights", checkpoints[SOURCE], "--output", str(tmp_path_factory.mktemp("cache") / SOURCE)])
    return build_cache_tool.build_cache(args)


def teacher_flags(checkpoints):
    return ["--distiller", "richkd", "--teacher", TEACHER, "--teacher-pretrained", checkpoints[TEACHER],
            "--teacher-precision", "fp32", "--no-eval-teacher"]


def build_in_process(tmp_path, experiment, *flags):
    argv = ["--img-size", "32", "-b", "32", "--workers", "0", "--lr", "0.01", "--crd-k", "16",
            "--output", str(tmp_path), "--experiment", experiment, *flags]
    return build_run(parse_args_with_config(build_train_parser(DISTILLERS), argv))


@pytest.mark.parametrize("student", sorted(STUDENTS))
@pytest.mark.parametrize("source", ["cache", "live"])
def test_every_mode_trains_two_steps(tmp_path, data_dir, checkpoints, cache, student, source):
    """L, F, then LF with mixup (cached rows mixed like the images); every extra head gets a gradient."""
    source_flags = ["--richkd-cache", cache] if source == "cache" else [
        "--richkd-source", SOURCE, "--richkd-source-pretrained", checkpoints[SOURCE], *LIVE_SOURCE_INPUT]
    for mode, mixup in (("L", "0"), ("F", "0"), ("LF", "0.8")):
        run = build_in_process(tmp_path, mode, *subset_flags(data_dir), *teacher_flags(checkpoints),
                               "--model", STUDENTS[student], "--richkd-mode", mode, "--mixup", mixup, *source_flags)
        assert run.data.kind == "fashion_mnist" and run.data.train_size == SUBSET
        before = {k: v.clone() for k, v in run.student.state_dict().items()}
        loader = iter(run.data.train_loader)
        run.model.train()
        for _ in range(2):
            batch = run.batches(next(loader))
            loss, losses = train_step(run.model, run.teacher, run.optimizer, batch, autocast=run.autocast,
                                      sources=run.sources)
            assert set(losses) == {"ce"} | {f"richkd_{t}" for t, m in (("logit", "L"), ("feat", "F")) if m in mode}
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in losses.values())
            for name, p in run.distiller.named_parameters():
                if not name.startswith("student."):
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert any(not torch.equal(v, before[k]) for k, v in run.student.state_dict().items() if v.is_floating_point())


def test_a_cache_of_another_subset_is_refused(tmp_path, data_dir, checkpoints, cache):
    with pytest.raises(UserError, match="built for another training set"):
        build_in_process(tmp_path, "other", *subset_flags(data_dir, seed=1), *teacher_flags(checkpoints),
                         "--model", STUDENTS["cnn"], "--richkd-mode", "L", "--richkd-cache", cache)
    assert not (tmp_path / "other").exists(), "nothing is written for a refused run"


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, data_dir, checkpoints, cache):
    """(L+F) from the cache, with mixup and a loader worker, SIGKILLed in epoch 1 and resumed from its last
    epoch-end checkpoint: weights, CRD banks, Z and step come back bit-identical."""
    args = [*subset_flags(data_dir), *teacher_flags(checkpoints), "--model", STUDENTS["cnn"], "--richkd-cache", cache,
            "--crd-k", "64", "--mixup", "0.2", "--img-size", "32", "--workers", "1", "-b", str(BATCH),
            "--log-interval", "1", "--epochs", "3", "--lr", "0.02", "--seed", "7", "--output", tmp_path]
    runs.train(1, *args, "--experiment", "reference")
    runs.train_and_kill(1, [*args, "--experiment", "killed"], tmp_path / "killed", "Train: 1 [   5/10")
    assert runs.last_state(tmp_path / "killed")["epoch"] == 0, "the kill must land in epoch 1"
    assert "continuing at epoch 1" in runs.train(1, "--resume", tmp_path / "killed" / "last.pth.tar")
    ref, res = runs.last_state(tmp_path / "reference"), runs.last_state(tmp_path / "killed")
    assert set(ref["distiller_extra"]) >= {f"contrast.{name}" for name in ("memory_student", "memory_teacher", "z",
                                                                          "step", "embed_t.source.linear.weight")}
    assert ref["distiller_extra"]["contrast.memory_student"].shape[0] == SUBSET
    assert (res["epoch"], res["global_step"]) == (ref["epoch"], ref["global_step"]) == (2, 30)
    for key in ("state_dict", "distiller_extra"):
        for name, tensor in ref[key].items():
            assert torch.equal(tensor, res[key][name]), f"{key}.{name}"
