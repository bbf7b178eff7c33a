"""--resume auto: which checkpoint of the run folder it continues from, and the run's identical command line
accepted again (the arguments as given are compared with those first given, not with the resolved ones)."""
import pytest
import torch
import yaml
from conftest import SMALL_RUN, run_main

from engine.checkpoint import CHECKPOINT_VERSION
from engine.run_folder import find_resume_point
from kdcore.errors import UserError


def _checkpoint(path, epoch, processes=1, **extra):
    torch.save({"version": CHECKPOINT_VERSION, "optimizer": {}, "epoch": epoch, "rng": [{}] * processes, **extra},
               path)


def test_the_newest_position_wins_and_last_counts_as_the_next_epoch(tmp_path):
    _checkpoint(tmp_path / "last.pth.tar", 1)  # (2, 0)
    _checkpoint(tmp_path / "recovery-1-5.pth.tar", 1, epoch_step=5)  # older than last
    _checkpoint(tmp_path / "best.pth.tar", 9)  # never a candidate
    assert find_resume_point(str(tmp_path), 1).path.endswith("last.pth.tar")
    _checkpoint(tmp_path / "recovery-2-3.pth.tar", 2, epoch_step=3)
    assert find_resume_point(str(tmp_path), 1).path.endswith("recovery-2-3.pth.tar")


def test_an_unreadable_newest_file_is_skipped_with_a_warning(tmp_path):
    _checkpoint(tmp_path / "last.pth.tar", 0)
    _checkpoint(tmp_path / "recovery-1-2.pth.tar", 1, epoch_step=2)
    data = (tmp_path / "recovery-1-2.pth.tar").read_bytes()
    (tmp_path / "recovery-1-2.pth.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "recovery-1-4.pth.tar").write_bytes(b"")
    point = find_resume_point(str(tmp_path), 1)
    assert point.path.endswith("last.pth.tar")
    assert len(point.warnings) == 2 and all("skips" in w for w in point.warnings)


def test_a_readable_but_refused_file_is_an_error(tmp_path):
    torch.save({"version": CHECKPOINT_VERSION - 1, "optimizer": {}, "epoch": 0, "rng": [{}]},
               tmp_path / "last.pth.tar")
    with pytest.raises(UserError, match="another version"):
        find_resume_point(str(tmp_path), 1)


def test_a_recovery_file_of_another_process_count_gives_way_to_the_epoch_checkpoint(tmp_path):
    _checkpoint(tmp_path / "last.pth.tar", 0, processes=2)
    _checkpoint(tmp_path / "recovery-1-2.pth.tar", 1, processes=2, epoch_step=2)
    point = find_resume_point(str(tmp_path), 4)
    assert point.path.endswith("last.pth.tar") and "written by 2 process(es)" in point.warnings[0]


def test_nothing_to_resume_starts_fresh_unless_results_would_be_overwritten(tmp_path):
    assert find_resume_point(str(tmp_path / "new"), 1).checkpoint is None
    (tmp_path / "log.txt").write_text("an attempt killed before its first checkpoint\n")
    assert "starting a fresh run" in find_resume_point(str(tmp_path), 1).notes[0]
    (tmp_path / "summary.csv").write_text("epoch\n0\n")
    with pytest.raises(UserError, match="no checkpoint that can be resumed"):
        find_resume_point(str(tmp_path), 1)


def test_the_identical_command_line_is_accepted_again(tmp_path):
    """A config naming a teacher for a vanilla run, lr: null with lr_base, --teacher-precision auto: the resolved
    arguments differ from these (teacher '', an lr, bf16 or fp32), the arguments as given do not."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"teacher": "test_resnet", "lr": None, "lr_base": 0.1,
                                      "teacher_precision": "auto"}))
    argv = [*SMALL_RUN, "-c", config, "--epochs", "1", "--output", tmp_path, "--experiment", "same", "--resume",
            "auto"]
    first = run_main("train.py", *argv)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_main("train.py", *argv)  # accepted, then stopped: the run has trained all its epochs
    assert again.returncode == 2 and "already finished its 1 epochs" in again.stderr, again.stderr
    changed = run_main("train.py", *argv, "--seed", "7")
    assert changed.returncode == 2 and "--seed 7 (the run has 42)" in changed.stderr, changed.stderr
