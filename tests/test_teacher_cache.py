"""--teacher-cache: the teacher's outputs on every epoch's training view, built once by tools/build_cache.py
--views augmented and read by runs of any layout. From an fp32 cache a run ends with the weights of the same run
with the live teacher, bit for bit; from fp16 within 1e-3 at the first step; every fingerprint difference, a
truncated cache and an old-format cache are refused, each with one clear error."""
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import runs
import torch
from conftest import REPO

import tools.build_cache as build_cache_tool
from distillers import DISTILLERS
from engine.cache import SourceCache
from engine.config import parse_args_with_config
from engine.run import build_run
from engine.teacher_cache import epoch_batches
from engine.train_args import build_train_parser
from engine.trainer import train
from kdcore.errors import UserError

TEACHER = "test_resnet"
# Augmentation, erasing and sample-paired Mixup/CutMix on; 48 images / batch 8: 6 steps an epoch, 2 epochs.
RUN = ["--dataset", "synthetic", "--synthetic-train-size", "48", "--synthetic-val-size", "16", "--img-size", "32",
       "--workers", "0", "-b", "8", "--epochs", "2", "--aa", "rand-m7-mstd0.5", "--reprob", "0.25", "--mixup", "0.8",
       "--cutmix", "1.0", "--mixup-pairing", "sample", "--model", "test_vit", "--teacher-precision", "fp32",
       "--lr", "0.02", "--warmup-epochs", "0", "--seed", "3", "--log-interval", "1", "--drop-path", "0.1"]


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    from engine.models import create_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(create_model(TEACHER, num_classes=10, img_size=32).state_dict(), path)
    return str(path)


def build(folder, checkpoint, *flags):
    argv = ["--views", "augmented", *RUN, "--teacher", TEACHER, "--teacher-pretrained", checkpoint,
            "--teacher-cache", str(folder), *flags]
    return build_cache_tool.build_augmented_cache(parse_args_with_config(build_cache_tool.build_augmented_parser(),
                                                                         argv))


@pytest.fixture(scope="module")
def fp32_cache(tmp_path_factory, teacher_checkpoint):
    return build(tmp_path_factory.mktemp("c32") / "cache", teacher_checkpoint, "--cache-dtype", "fp32", "--store",
                 "logits", "embedding")


@pytest.fixture(scope="module")
def fp16_cache(tmp_path_factory, teacher_checkpoint):
    return build(tmp_path_factory.mktemp("c16") / "cache", teacher_checkpoint, "--store", "logits", "embedding")


def trained(folder, name, *flags):
    args = parse_args_with_config(build_train_parser(DISTILLERS), [*RUN, *flags, "--output", str(folder),
                                                                   "--experiment", name])
    run = build_run(args)
    train(run)
    return run, (folder / name / "log.txt").read_text()


def logged_losses(log, term):
    return [float(v) for v in re.findall(rf" {term} ([0-9.]+)", log)]


@pytest.mark.parametrize("distiller, term", [("kd", "kd"), ("rsd", "rsd")])
def test_an_fp32_cache_trains_the_weights_of_the_live_teacher_bit_for_bit(tmp_path, teacher_checkpoint, fp32_cache,
                                                                           distiller, term):
    live, live_log = trained(tmp_path, "live", "--distiller", distiller, "--teacher", TEACHER,
                             "--teacher-pretrained", teacher_checkpoint)
    cached, cached_log = trained(tmp_path, "cached", "--distiller", distiller, "--teacher-cache", fp32_cache)
    assert cached.teacher.__class__.__name__ == "CachedTeacher"
    assert "no teacher model is built" in cached_log and "recorded when the cache was built" in cached_log
    assert logged_losses(live_log, term) == logged_losses(cached_log, term) and len(logged_losses(live_log, term)) == 12
    for name, weight in live.student.state_dict().items():
        assert torch.equal(cached.student.state_dict()[name], weight), name


def test_an_fp16_cache_agrees_within_its_tolerance(tmp_path, teacher_checkpoint, fp16_cache):
    _, live_log = trained(tmp_path, "live", "--distiller", "kd", "--teacher", TEACHER, "--teacher-pretrained",
                          teacher_checkpoint)
    _, cached_log = trained(tmp_path, "cached", "--distiller", "kd", "--teacher-cache", fp16_cache, "--teacher",
                            TEACHER, "--teacher-pretrained", teacher_checkpoint, "--check-cache", "16")
    live, cached = logged_losses(live_log, "kd"), logged_losses(cached_log, "kd")
    assert abs(live[0] - cached[0]) <= 1e-3 * live[0]
    assert all(abs(a - b) <= 1e-2 * a for a, b in zip(live, cached, strict=True))
    found = re.search(r"--check-cache 16: largest deviation logits ([0-9.e+-]+) of the largest value "
                      r"\(tolerance 0.001, fp16\)", cached_log)
    assert found and 0 < float(found[1]) <= 1e-3, "fp16 rounding shows, within the tolerance"


def test_one_and_two_process_builds_are_byte_identical_in_their_arrays(tmp_path, teacher_checkpoint, fp32_cache):
    """Built here by 1 process in batch order 0..47; a build with another batch size must give the same bytes
    too (fp32 outputs do not depend on the batch, except at batch 1, which the builder never runs)."""
    other = build(tmp_path / "b4", teacher_checkpoint, "--cache-dtype", "fp32", "--store", "logits", "embedding",
                  "-b", "6")
    for name in ("logits.npy", "embedding.npy"):
        assert open(f"{other}/{name}", "rb").read() == open(f"{fp32_cache}/{name}", "rb").read(), name


def test_the_last_batch_is_padded_never_a_single_sample():
    batches = epoch_batches(5, 14, 4)
    assert batches == [([5, 6, 7, 8], 4), ([9, 10, 11, 12], 4), ([13, 13, 13, 13], 1)]


@pytest.mark.parametrize("flags, field", [
    (["--seed", "4"], "views.aug_seed"),
    (["--reprob", "0.5"], "views.reprob"),
    (["--mixup-pairing", "sample", "--cutmix", "0"], "views.cutmix"),
    (["--teacher-precision", "bf16"], "teacher.precision"),
    (["--scale", "0.5", "1.0"], "views.scale"),
    (["--synthetic-seed", "1"], "another training set"),
    (["--holdout", "8"], "another training set"),  # the held-out images leave another training set
])
def test_a_fingerprint_difference_is_refused_naming_the_field(tmp_path, fp32_cache, flags, field):
    with pytest.raises(UserError, match=re.escape(field)):
        trained(tmp_path, "refused", "--distiller", "kd", "--teacher-cache", fp32_cache, *flags)
    assert not (tmp_path / "refused").exists(), "nothing half-written"


def test_aug_seed_lets_runs_of_another_seed_share_the_cache(tmp_path, fp32_cache):
    run, _ = trained(tmp_path, "other_seed", "--distiller", "kd", "--teacher-cache", fp32_cache, "--seed", "9",
                     "--aug-seed", "3", "--epochs", "1")
    assert run.progress.global_step == 6


def test_other_refusals(tmp_path, teacher_checkpoint, fp32_cache, saved_weights):
    with pytest.raises(UserError, match="covers 2 epochs"):
        trained(tmp_path, "more_epochs", "--distiller", "kd", "--teacher-cache", fp32_cache, "--epochs", "3")
    other_weights = saved_weights(TEACHER, num_classes=10, filename="other.pth")
    torch.save({k: v + 1 for k, v in torch.load(other_weights).items()}, other_weights)
    with pytest.raises(UserError, match="teacher.weights_sha256"):
        trained(tmp_path, "other_teacher", "--distiller", "kd", "--teacher-cache", fp32_cache, "--teacher", TEACHER,
                "--teacher-pretrained", other_weights)
    with pytest.raises(UserError, match="stage maps"):
        trained(tmp_path, "fitnet", "--distiller", "fitnet", "--teacher-cache", fp32_cache)
    with pytest.raises(UserError, match="--mixup-pairing sample"):
        build(tmp_path / "batch_pairing", teacher_checkpoint, "--mixup-pairing", "batch")
    assert not (tmp_path / "batch_pairing").exists() and not (tmp_path / "batch_pairing.partial").exists()
    with pytest.raises(UserError, match="--aug-repeats"):
        build(tmp_path / "repeats", teacher_checkpoint, "--aug-repeats", "3")


def test_a_truncated_or_old_format_cache_is_refused(tmp_path, fp32_cache):
    import shutil
    truncated = tmp_path / "truncated"
    shutil.copytree(fp32_cache, truncated)
    data = (truncated / "logits.npy").read_bytes()
    (truncated / "logits.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="truncated cache"):
        trained(tmp_path, "t", "--distiller", "kd", "--teacher-cache", str(truncated))
    old = tmp_path / "old"
    shutil.copytree(fp32_cache, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(UserError, match="rebuild with tools/build_cache.py"):
        trained(tmp_path, "o", "--distiller", "kd", "--teacher-cache", str(old))


def test_a_cached_row_is_the_teachers_output_on_the_view_the_training_loader_builds(tmp_path, teacher_checkpoint,
                                                                                   fp32_cache):
    """The live run's own batches (shuffled, of epoch 1): each row read by (epoch, index) equals the live teacher's
    output on that batch, to the bit; and each epoch holds its own views."""
    args = parse_args_with_config(build_train_parser(DISTILLERS), [
        *RUN, "--distiller", "kd", "--teacher", TEACHER, "--teacher-pretrained", teacher_checkpoint,
        "--output", str(tmp_path), "--experiment", "live"])
    run = build_run(args)
    cache = SourceCache(fp32_cache)
    run.data.train_loader.sampler.set_epoch(1)
    for views in run.data.train_loader:
        batch = run.batches(views)
        assert batch.epoch == 1
        assert torch.equal(cache.lookup(batch.index, batch.epoch).logits, run.teacher(batch).logits)
    assert cache.meta["views"] == "augmented" and cache.meta["epochs"] == 2 and cache.meta["dtype"] == "fp32"
    logits = cache.arrays["logits"]
    assert logits.shape == (2, 48, 10) and not np.array_equal(logits[0], logits[1]), "each epoch its own views"


def cli_build(folder, checkpoint, nproc):
    """tools/build_cache.py in its own process(es), one intra-op thread each (fp32 CPU kernels round differently
    with another thread count, so equal bytes need equal thread counts)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    result = subprocess.run([sys.executable, *launcher, "tools/build_cache.py", "--views", "augmented", *RUN,
                             "--teacher", TEACHER, "--teacher-pretrained", checkpoint, "--teacher-cache", str(folder),
                             "--cache-dtype", "fp32", "--store", "logits", "embedding"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_a_two_process_build_writes_the_bytes_of_a_one_process_build(tmp_path, teacher_checkpoint):
    """torchrun with 2 gloo processes: the batches are dealt out in turn, each process writes its rows; the arrays
    are byte-identical and the meta equal but for how it was built."""
    one, two = cli_build(tmp_path / "one", teacher_checkpoint, 1), cli_build(tmp_path / "two", teacher_checkpoint, 2)
    for name in ("logits.npy", "embedding.npy"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    one, two = (json.loads((f / "meta.json").read_text()) for f in (one, two))
    assert two["build"]["processes"] == 2 and one["build"]["processes"] == 1
    assert {**one, "build": None} == {**two, "build": None}


def test_a_top_k_cache_of_every_class_equals_the_full_cache(tmp_path, teacher_checkpoint, fp32_cache):
    topk = build(tmp_path / "topk", teacher_checkpoint, "--cache-dtype", "fp32", "--cache-topk", "10")
    full, approximate = SourceCache(fp32_cache), SourceCache(topk)
    assert set(approximate.arrays) == {"logits_values", "logits_index", "logits_lse"}
    index = torch.arange(48)
    for epoch in (0, 1):
        assert torch.equal(approximate.lookup(index, epoch).logits, full.lookup(index, epoch).logits)


def test_top_k_rows_keep_the_softmax_of_the_k_classes_and_the_mass_of_the_rest():
    """At T = 1 the K kept classes' probabilities are exact and the others share the rest equally."""
    from engine.cache import fill_topk
    logits = torch.randn(6, 100, dtype=torch.float64) * 3
    values, index = logits.topk(10, dim=1)
    filled = fill_topk(values, index, logits.logsumexp(dim=1, keepdim=True), 100)
    p, q = logits.softmax(dim=1), filled.softmax(dim=1)
    torch.testing.assert_close(q.gather(1, index), p.gather(1, index), rtol=1e-12, atol=0)
    rest = 1 - p.gather(1, index).sum(dim=1, keepdim=True)
    others = torch.ones_like(q, dtype=torch.bool).scatter_(1, index, False)
    torch.testing.assert_close(q[others].view(6, 90), (rest / 90).expand(6, 90), rtol=1e-10, atol=0)


def cached_run_args(cache, output, name, *flags):
    # Stochastic depth off: its per-process stream would differ between 1 and 2 processes.
    return [*RUN, "--distiller", "kd", "--teacher-cache", cache, "--drop-path", "0", "--output", str(output),
            "--experiment", name, *flags]


@pytest.mark.slow
def test_two_cached_processes_train_like_one_on_the_global_batch(tmp_path, fp32_cache):
    runs.train(1, *cached_run_args(fp32_cache, tmp_path, "one", "-b", "8"))
    runs.train(2, *cached_run_args(fp32_cache, tmp_path, "two", "-b", "4"))
    one, two = (runs.last_state(tmp_path / n)["state_dict"] for n in ("one", "two"))
    flat = [torch.cat([v.flatten().double() for v in s.values() if v.is_floating_point()]) for s in (one, two)]
    assert (flat[0] - flat[1]).norm() <= 1e-5 * flat[0].norm()


@pytest.mark.slow
def test_a_cached_run_killed_mid_epoch_resumes_bit_identically(tmp_path, fp32_cache):
    runs.train(1, *cached_run_args(fp32_cache, tmp_path, "reference", "--recovery-interval", "4"))
    killed = tmp_path / "killed"
    runs.train_and_kill(1, cached_run_args(fp32_cache, tmp_path, "killed", "--recovery-interval", "4"), killed,
                        "Train: 1 [   5/6")
    (epoch, step), latest = max(runs.recovery_positions(killed).items())
    assert (epoch, step) == (1, 2)  # global step 8, at 6 steps an epoch
    runs.train(1, "--resume", latest)
    reference, resumed = runs.last_state(tmp_path / "reference"), runs.last_state(killed)
    for name, weight in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], weight), name


def test_a_dry_run_builds_every_view_and_writes_nothing(tmp_path, teacher_checkpoint, capsys):
    assert build(tmp_path / "dry", teacher_checkpoint, "--dry-run") is None
    assert "dry run: 48 views in" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_a_build_the_disk_cannot_hold_is_refused_before_anything_is_written(tmp_path, teacher_checkpoint,
                                                                            monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10 ** 6, used=10 ** 6, free=100))
    with pytest.raises(UserError, match=r"the cache needs 0.00 GiB but .* has 0.00 GiB free"):
        build(tmp_path / "full", teacher_checkpoint)
    assert not (tmp_path / "full").exists() and not (tmp_path / "full.partial").exists()


def test_a_build_stopped_by_a_signal_continues_to_the_same_bytes(tmp_path, teacher_checkpoint, fp32_cache,
                                                                 monkeypatch):
    """A real SIGTERM to this process once the first round is recorded: the build stops there with Preempted
    (exit code 75 from the CLI); the same command finishes it, with the bytes of an uninterrupted build."""
    import signal

    from engine.cache import CacheWriter
    from kdcore.errors import Preempted
    mark_done = CacheWriter.mark_done

    def mark_done_then_signal(self, done):
        mark_done(self, done)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(CacheWriter, "mark_done", mark_done_then_signal)
    flags = ("--cache-dtype", "fp32", "--store", "logits", "embedding")
    with pytest.raises(Preempted, match="stopped by a signal after 8 of 96 views"):
        build(tmp_path / "stopped", teacher_checkpoint, *flags)
    monkeypatch.setattr(CacheWriter, "mark_done", mark_done)
    finished = build(tmp_path / "stopped", teacher_checkpoint, *flags)
    for name in ("logits.npy", "embedding.npy"):
        assert open(f"{finished}/{name}", "rb").read() == open(f"{fp32_cache}/{name}", "rb").read(), name
