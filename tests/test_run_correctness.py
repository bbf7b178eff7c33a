"""Evaluation, best-checkpoint choice, schedulers, resume arguments and summary durability (one process).

The student is a BatchNorm CNN (ResNet18 at 32 px), as most of the paper's students are.
"""
import csv
import json
import os

import pytest
import torch
import yaml
from conftest import SMALL_RUN, run_main

BN_RUN = [*SMALL_RUN, "--model", "resnet18", "--warmup-epochs", "0"]


def train(tmp_path, name, *args, expect_ok=True):
    result = run_main("train.py", *BN_RUN, "--output", tmp_path, "--experiment", name, *args)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def summary_rows(folder):
    with open(os.path.join(folder, "summary.csv")) as f:
        return list(csv.DictReader(f))


def test_evaluation_changes_no_buffer_and_keeps_the_mode():
    """Defect 1: evaluation ran the student in train mode, so BatchNorm statistics moved on validation data."""
    from engine.loop import evaluate
    from engine.models import create_model
    from kdcore.distributed import DistEnv
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, img_size=32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = [(torch.randn(8, 3, 32, 32) * 3 + 1, torch.randint(0, 10, (8,))) for _ in range(2)]
    metrics = evaluate(model, loader, DistEnv())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"evaluation changed {name}"
    assert model.training, "the model must come back in the mode it had"
    with torch.no_grad():
        logits = torch.cat([model.eval()(x) for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    assert metrics["top1"] == pytest.approx(100 * (logits.argmax(1) == targets).double().mean().item())


@pytest.mark.slow
def test_logged_best_equals_validate_on_best_checkpoint_with_batchnorm_student(tmp_path):
    """The best top-1 in the log is what validate.py scores on best.pth.tar (eval mode both times), with EMA."""
    train(tmp_path, "bn", "--epochs", "2", "--lr", "0.05", "--model-ema", "--model-ema-decay", "0.5")
    folder = tmp_path / "bn"
    checkpoint = torch.load(folder / "best.pth.tar", weights_only=True)
    best_row = summary_rows(folder)[checkpoint["best_epoch"]]
    for flag, column in (([], "eval_top1"), (["--use-ema"], "eval_ema_top1")):
        result = run_main("validate.py", "--checkpoint", folder / "best.pth.tar", "--workers", "0", *flag)
        assert result.returncode == 0, result.stderr[-2000:]
        scored = json.loads(result.stdout.strip().splitlines()[-1])
        assert scored["top1"] == pytest.approx(float(best_row[column]), abs=1e-3), column
    assert checkpoint["best_metric"] == pytest.approx(float(best_row["eval_top1"]))


def test_improves_treats_zero_as_a_value_and_loss_as_lower_is_better():
    """Defect 4: a best value of 0.0 was treated as unset."""
    from engine.trainer import improves
    assert improves(0.1, None, "top1") and improves(5.0, None, "loss")
    assert not improves(0.0, 0.0, "top1") and not improves(-0.5, 0.0, "top1") and improves(0.1, 0.0, "top1")
    assert improves(0.4, 0.5, "loss") and not improves(0.6, 0.5, "loss") and improves(0.4, 0.5, "ema_loss")


def test_eval_metric_loss_keeps_the_lowest_loss(tmp_path):
    """Defect 4: `--eval-metric loss` crashed at the first epoch."""
    train(tmp_path, "loss", "--epochs", "2", "--eval-metric", "loss")
    rows = summary_rows(tmp_path / "loss")
    losses = [float(row["eval_loss"]) for row in rows]
    checkpoint = torch.load(tmp_path / "loss" / "best.pth.tar", weights_only=True)
    assert checkpoint["best_epoch"] == losses.index(min(losses))
    assert checkpoint["best_metric"] == pytest.approx(min(losses))


def test_unknown_eval_metric_is_refused_before_training(tmp_path):
    result = train(tmp_path, "bad", "--eval-metric", "accuracy", expect_ok=False)
    assert result.returncode == 2 and "--eval-metric 'accuracy' is not one of top1, top5, loss" in result.stderr
    assert not os.path.exists(tmp_path / "bad")


def test_plateau_scheduler_decays_when_the_metric_stalls(tmp_path):
    """Defect 5: the plateau scheduler was stepped without the metric, so it never decayed."""
    # Gradients clipped to 1e-12 and no BatchNorm: the weights, hence the eval loss, stand still.
    train(tmp_path, "plateau", "--epochs", "3", "--sched", "plateau", "--patience-epochs", "0", "--lr", "0.01",
          "--model", "deit_tiny_patch16_224", "--clip-grad", "1e-12", "--clip-mode", "value",
          "--decay-rate", "0.1", "--eval-metric", "loss")
    lrs = [float(row["lr"]) for row in summary_rows(tmp_path / "plateau")]
    assert lrs == pytest.approx([0.01, 0.01, 0.001]), lrs


def test_resume_takes_the_runs_own_arguments(tmp_path):
    """Defect 6: --resume used the new command's arguments (here lr 0.05, the default) and rewrote args.yaml."""
    train(tmp_path, "run", "--epochs", "1", "--lr", "0.02", "--seed", "3")
    resumed = run_main("train.py", "--resume", tmp_path / "run" / "last.pth.tar", "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    recorded = yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())
    assert (recorded["lr"], recorded["seed"], recorded["epochs"], recorded["model"]) == (0.02, 3, 2, "resnet18")
    checkpoint = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["lr"] == 0.02


@pytest.mark.parametrize("flags,named", [(["--lr", "0.1"], "--lr 0.1 (the run has 0.02)"),
                                          (["--model", "resnet34"], "--model 'resnet34' (the run has 'resnet18')")])
def test_resume_refuses_a_conflicting_flag(tmp_path, flags, named):
    """Defects 6 and 13: a changed flag (another --model gave a state-dict dump) is one clear error."""
    train(tmp_path, "run", "--epochs", "1", "--lr", "0.02")
    before = (tmp_path / "run" / "last.pth.tar").read_bytes()
    result = run_main("train.py", "--resume", tmp_path / "run" / "last.pth.tar", "--epochs", "2", *flags)
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert (tmp_path / "run" / "last.pth.tar").read_bytes() == before


def test_summary_has_one_row_per_epoch_after_a_crash_between_summary_and_checkpoint(tmp_path):
    """Defect 9: a row written for an epoch whose checkpoint never landed came back twice after --resume."""
    train(tmp_path, "run", "--epochs", "1")
    folder = tmp_path / "run"
    with open(folder / "summary.csv", "a") as f:  # what a crash after the summary, before the checkpoint, leaves
        f.write("1,9.9,9.9,9.9,9.9,0.1\n")
    resumed = run_main("train.py", "--resume", folder / "last.pth.tar", "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["epoch"] for row in summary_rows(folder)] == ["0", "1"]
    assert "9.9" not in (folder / "summary.csv").read_text()


def test_atomic_writes_sync_the_folder(tmp_path, monkeypatch):
    """Defect 9: after the rename the folder entry itself must reach the disk, for the best copies too."""
    import stat

    from kdcore import io as atomic_io
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_io.atomic_save({"x": torch.ones(2)}, str(tmp_path / "last.pth.tar"))
    assert synced == ["file", "dir"]
    atomic_io.atomic_copy(str(tmp_path / "last.pth.tar"), str(tmp_path / "best.pth.tar"))
    assert synced == ["file", "dir", "file", "dir"]
    assert torch.equal(torch.load(tmp_path / "best.pth.tar", weights_only=True)["x"], torch.ones(2))
