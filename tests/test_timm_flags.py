"""Flags with timm train.py's names and meaning: --lr-base, --model-kwargs, --torchcompile-mode, --mixup-off-epoch,
--model-ema-warmup, --no-resume-opt; validate.py's --results-file and --channels-last; timm's PrefetchLoader."""
import csv
import json
import math

import pytest
import timm
import torch
import yaml
from conftest import SMALL_RUN
from timm.data.loader import PrefetchLoader
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from distillers import DISTILLERS
from engine.checkpoint import read_training_checkpoint
from engine.config import parse_args_with_config, resumed_arguments
from engine.loader import MixupWithLabels, build_loaders, load_datasets, resolve_data_settings, uses_prefetcher
from engine.optim import resolve_lr
from engine.run import build_emas, build_run, build_student, check_arguments
from engine.run_folder import ResumePoint
from engine.train_args import build_train_parser
from engine.trainer import train
from kdcore.distributed import DistEnv
from kdcore.errors import UserError

CLASSES, SMOOTHING = 10, 0.1
# one step per epoch, the smallest timm ViT (BatchNorm-free, so a batch of 8 is enough)
TINY = [*SMALL_RUN, "--model", "test_vit", "-b", "8", "--synthetic-train-size", "8", "--synthetic-val-size", "8",
        "--warmup-epochs", "0"]


def parse(*argv):
    return parse_args_with_config(build_train_parser(DISTILLERS), [str(a) for a in argv])


# --lr-base ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2])
def test_lr_base_scales_linearly_with_the_global_batch(world_size):
    args = parse("--lr-base", "0.4", "--lr-base-size", "64", "-b", "16")
    resolve_lr(args, world_size)
    assert args.lr == pytest.approx(0.4 * 16 * world_size / 64) and args.lr_base_scale == "linear"
    args = parse("--lr-base", "0.4", "--lr-base-size", "64", "-b", "16")
    args.grad_accum_steps = 3  # counted in the global batch when the run accumulates gradients
    resolve_lr(args, world_size)
    assert args.lr == pytest.approx(0.4 * 16 * world_size * 3 / 64)


@pytest.mark.parametrize("world_size", [1, 2])
def test_lr_base_scales_by_the_square_root_for_adaptive_optimizers(world_size):
    args = parse("--lr-base", "1e-3", "--lr-base-size", "512", "-b", "32", "--opt", "adamw")
    resolve_lr(args, world_size)
    assert args.lr == pytest.approx(1e-3 * math.sqrt(32 * world_size / 512)) and args.lr_base_scale == "sqrt"
    args = parse("--lr-base", "1e-3", "--lr-base-size", "512", "-b", "32", "--opt", "adamw",
                 "--lr-base-scale", "linear")
    resolve_lr(args, world_size)
    assert args.lr == pytest.approx(1e-3 * 32 * world_size / 512)


def test_lr_without_lr_base_is_kept_and_defaults_to_0_05():
    args = parse("--lr", "0.3")
    resolve_lr(args, 2)
    assert args.lr == 0.3
    args = parse()
    resolve_lr(args, 2)
    assert args.lr == 0.05


def test_lr_and_lr_base_together_are_refused_before_any_file(tmp_path):
    args = parse(*TINY, "--lr", "0.1", "--lr-base", "0.1", "--output", tmp_path)
    with pytest.raises(UserError, match="--lr 0.1 and --lr-base 0.1 are both set"):
        build_run(args)
    assert not list(tmp_path.iterdir())


# --model-kwargs -----------------------------------------------------------------------------------------------

def test_model_kwargs_reach_the_student():
    args = parse("--model", "test_vit", "--img-size", "32", "--num-classes", CLASSES, "--model-kwargs", "depth=1",
                 "global_pool=avg")
    assert args.model_kwargs == {"depth": 1, "global_pool": "avg"}  # literals parsed, other values kept as text
    student = build_student(args)
    expected = timm.create_model("test_vit", img_size=32, num_classes=CLASSES, depth=1, global_pool="avg")
    default = timm.create_model("test_vit", img_size=32, num_classes=CLASSES)
    count = sum(p.numel() for p in student.parameters())
    assert count == sum(p.numel() for p in expected.parameters()) < sum(p.numel() for p in default.parameters())
    assert len(student.blocks) == 1 and student.global_pool == "avg"


def test_model_kwargs_that_flags_set_or_the_model_rejects_are_user_errors():
    with pytest.raises(UserError, match="drop_path_rate, which the run sets from --drop-path"):
        check_arguments(parse("--model-kwargs", "drop_path_rate=0.1"), DistEnv())
    args = parse("--model", "test_vit", "--num-classes", CLASSES, "--model-kwargs", "no_such_argument=1")
    with pytest.raises(UserError, match="takes no argument no_such_argument=1; remove it from --model-kwargs"):
        build_student(args)


# --torchcompile-mode ------------------------------------------------------------------------------------------

def test_torchcompile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    run = build_run(parse(*TINY, "--compile", "--torchcompile-mode", "max-autotune", "--output", tmp_path))
    run.writer.close()
    assert calls == [{"mode": "max-autotune"}]
    with pytest.raises(UserError, match="--torchcompile-mode reduce-overhead needs --compile"):
        check_arguments(parse("--torchcompile-mode", "reduce-overhead"), DistEnv())


# --model-ema-warmup -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup", [True, False])
def test_ema_decay_follows_timm_warmup(warmup):
    """Update n (1-based, as timm counts): ema = d * ema + (1 - d) * model, where d = min(decay, 1 - n^(-2/3))
    with warmup, else decay; the first update copies the model either way."""
    decay = 0.99
    model = torch.nn.Linear(3, 2)
    args = parse("--model-ema", "--model-ema-decay", decay, *(["--model-ema-warmup"] if warmup else []))
    (ema,) = build_emas(args, model)
    for n in (1, 2, 10, 5000):
        before = ema.module.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, step=n)
        d = min(decay, 1 - n ** (-2 / 3)) if warmup else (0.0 if n == 1 else decay)
        torch.testing.assert_close(ema.module.weight, d * before + (1 - d) * model.weight, rtol=0, atol=1e-6)


# one short run shared by the --mixup-off-epoch, --model-ema-warmup and --no-resume-opt tests ---------------------

@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """2 epochs of 1 step with mixup on, --mixup-off-epoch 1 and a warmed-up EMA. Every mixup call is recorded as
    (images in, labels in, images out, targets, hard labels, lam), and the step of every EMA update."""
    folder = tmp_path_factory.mktemp("mixup_off")
    calls, ema_steps = [], []
    mixup, ema_update = MixupWithLabels.__call__, ModelEmaV3.update

    def recorded_mixup(self, images, labels):
        images_in, labels_in = images.clone(), labels.clone()
        out = mixup(self, images, labels)
        calls.append((images_in, labels_in, *out))
        return out

    def recorded_update(self, model, step=None):
        ema_steps.append(step)
        return ema_update(self, model, step=step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MixupWithLabels, "__call__", recorded_mixup)
        patch.setattr(ModelEmaV3, "update", recorded_update)
        args = parse(*TINY, "--epochs", "2", "--mixup", "1.0", "--mixup-off-epoch", "1", "--smoothing", SMOOTHING,
                     "--lr", "0.1", "--model-ema", "--model-ema-warmup", "--output", folder, "--experiment", "run")
        train(build_run(args))
    return folder / "run", calls, ema_steps


def test_the_ema_is_updated_with_timm_update_count(mixed_run):
    assert mixed_run[2] == [1, 2]


def test_batches_from_the_mixup_off_epoch_on_are_not_mixed(mixed_run):
    _, calls, _ = mixed_run
    assert len(calls) == 2  # one step in each of the 2 epochs
    (_, _, _, _, _, lam_0), (images_in, labels, images, targets, hard, lam_1) = calls
    assert lam_0 < 1  # epoch 0 mixes (mixup prob 1)
    assert lam_1 == 1.0
    assert torch.equal(images, images_in) and torch.equal(hard, labels)
    smoothed = torch.full((len(labels), CLASSES), SMOOTHING / CLASSES)
    smoothed[torch.arange(len(labels)), labels] += 1 - SMOOTHING
    torch.testing.assert_close(targets, smoothed)


def _resume(folder, *flags):
    path = str(folder / "last.pth.tar")
    checkpoint = read_training_checkpoint(path)
    args = resumed_arguments(build_train_parser(DISTILLERS), ["--resume", path, "--epochs", "3", *flags],
                             checkpoint["args"])
    run = build_run(args, ResumePoint(path=path, checkpoint=checkpoint))
    run.writer.close()
    return run, checkpoint


def test_no_resume_opt_keeps_the_weights_and_starts_the_optimizer_afresh(mixed_run):
    folder, _, _ = mixed_run
    restored, _ = _resume(folder)
    assert restored.optimizer.state  # SGD momentum buffers come back without the flag
    run, checkpoint = _resume(folder, "--no-resume-opt")
    assert not run.optimizer.state
    for name, value in run.student.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name]), name
    assert run.progress.start_epoch == 2
    # a fresh cosine schedule over 3 epochs (no warmup, min lr 0), placed at epoch 2
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    # the flag belongs to the launch: a later resume without it restores the optimizer again
    again = resumed_arguments(build_train_parser(DISTILLERS), ["--resume", "x"], vars(run.args))
    assert again.no_resume_opt is False


def test_resolved_lr_is_logged_and_recorded(tmp_path):
    run = build_run(parse(*TINY, "--lr-base", "0.8", "--lr-base-size", "32", "--output", tmp_path,
                          "--experiment", "lr"))
    run.writer.close()
    expected = 0.8 * 8 / 32
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert yaml.safe_load((tmp_path / "lr" / "args.yaml").read_text())["lr"] == pytest.approx(expected)
    assert f"Learning rate {expected:g} (--lr-base 0.8" in (tmp_path / "lr" / "log.txt").read_text()


# PrefetchLoader -----------------------------------------------------------------------------------------------

def test_prefetch_loaders_yield_the_batches_of_the_cpu_loaders():
    """timm's PrefetchLoader (chosen on CUDA; forced here, on the CPU) normalises uint8 evaluation batches itself:
    the same images and labels as the loader that normalises in the workers. Training batches are uint8 views on
    both paths (normalised later, on the device), so they are identical."""
    assert uses_prefetcher("cuda") and not uses_prefetcher("cpu")
    args = parse(*TINY, "--synthetic-train-size", "24", "--reprob", "0.5")
    model = timm.create_model("test_vit", img_size=32, num_classes=CLASSES)
    loaders = {}
    for prefetch in (False, True):
        _, train_set, val_set = load_datasets(args)
        config = resolve_data_settings(args, model, train_set)
        loaders[prefetch] = build_loaders(args, DistEnv(), train_set, val_set, config, prefetch=prefetch)
    _, train_set, val_set = load_datasets(args)
    default = build_loaders(args, DistEnv(), train_set, val_set, config)
    assert isinstance(default[1], DataLoader)  # on the CPU: torch's loader, normalising in the workers
    cpu_train, cpu_val = loaders[False]
    assert isinstance(loaders[True][1], PrefetchLoader)
    for cpu_batch, prefetched in zip(cpu_train, loaders[True][0], strict=True):
        assert prefetched.images.dtype == torch.uint8 and torch.equal(prefetched.images, cpu_batch.images)
        assert torch.equal(prefetched.index, cpu_batch.index) and torch.equal(prefetched.erase, cpu_batch.erase)
    for (cpu_images, cpu_labels), (images, labels) in zip(cpu_val, loaders[True][1], strict=True):
        torch.testing.assert_close(images, cpu_images, rtol=0, atol=1e-5)
        assert torch.equal(labels, cpu_labels)


# validate.py --results-file, --channels-last, recorded --model-kwargs ---------------------------------------------

VALIDATE = ["--dataset", "synthetic", "--synthetic-val-size", "32", "--img-size", "32", "--workers", "0", "-b", "16",
            "--num-classes", CLASSES]


def _validate(capsys, *argv):
    import validate
    validate.main([str(a) for a in argv])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_results_file_holds_the_printed_numbers(tmp_path, capsys, saved_weights):
    checkpoint = saved_weights("test_resnet", num_classes=CLASSES)
    printed = _validate(capsys, *VALIDATE, "--model", "test_resnet", "--checkpoint", checkpoint,
                        "--results-file", tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{key: str(value) for key, value in printed.items()}]
    again = _validate(capsys, *VALIDATE, "--model", "test_resnet", "--checkpoint", checkpoint, "--channels-last",
                      "--results-file", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == [again]
    assert again["top1"] == printed["top1"] and again["loss"] == pytest.approx(printed["loss"], abs=2e-4)
    assert not list(tmp_path.glob("*.tmp"))


def test_results_file_with_another_extension_is_refused_before_evaluating(tmp_path, capsys, saved_weights):
    checkpoint = saved_weights("test_resnet", num_classes=CLASSES)
    with pytest.raises(SystemExit) as exit_info:
        _validate(capsys, *VALIDATE, "--model", "test_resnet", "--checkpoint", checkpoint,
                  "--results-file", tmp_path / "r.txt")
    assert exit_info.value.code == 2
    assert "--results-file" in capsys.readouterr().err and not (tmp_path / "r.txt").exists()


def test_validate_builds_the_model_with_the_recorded_model_kwargs(tmp_path, capsys):
    model = timm.create_model("test_vit", img_size=32, num_classes=CLASSES, depth=1)
    path = tmp_path / "run.pth.tar"
    torch.save({"args": {"model": "test_vit", "model_kwargs": {"depth": 1}, "num_classes": CLASSES, "img_size": 32},
                "state_dict": model.state_dict()}, path)
    printed = _validate(capsys, *VALIDATE, "--checkpoint", path)
    assert printed["param_count"] == sum(p.numel() for p in model.parameters())
