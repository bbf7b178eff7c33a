"""Checkpoints are complete: a run SIGKILLed mid-epoch and resumed from its last epoch-end checkpoint
(last.pth.tar) ends with the weights, EMA, distiller state and summary of the uninterrupted reference run, bit for
bit, with one and with two processes. The reference and killed runs (tests/runs.py) are trained once per session."""
import pytest
import runs


def resume_from_epoch_end(nproc, killed, tmp_path):
    folder = runs.copy_run(killed, tmp_path / "killed")
    assert runs.last_state(folder)["epoch"] == 0, "the kill must land in epoch 1, after epoch 0's checkpoint"
    out = runs.train(nproc, "--resume", folder / "last.pth.tar")  # the run's own arguments come back
    assert "Resumed from" in out and "continuing at epoch 1\n" in out
    return folder


@pytest.mark.slow
def test_one_process_resumed_from_the_epoch_end_matches_uninterrupted(tmp_path, one_process_reference,
                                                                      one_process_killed):
    """A BatchNorm CNN student with CRD, mixup, EMA, stochastic depth and a loader worker; CRD's memory
    banks, normaliser and step counter come back with the weights."""
    folder = resume_from_epoch_end(1, one_process_killed, tmp_path)
    reference, resumed = runs.last_state(one_process_reference), runs.last_state(folder)
    runs.assert_same_training_state(reference, resumed, 1)
    extra = resumed["distiller_extra"]
    assert {f"contrast.{n}" for n in ("memory_student", "memory_teacher", "z", "step")} <= set(extra)
    assert int(extra["contrast.step"]) == 3 * runs.STEPS_PER_EPOCH[1]
    summary = (folder / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["0", "1", "2"]
    assert (one_process_reference / "summary.csv").read_text().splitlines() == summary


@pytest.mark.slow
def test_two_processes_resumed_from_the_epoch_end_match_uninterrupted(tmp_path, two_process_reference,
                                                                    two_process_killed):
    """Defect 3: a resumed 2-process run restored rank 0's RNG states on every rank, so rank 1's data
    augmentation and mixup diverged from the uninterrupted run."""
    folder = resume_from_epoch_end(2, two_process_killed, tmp_path)
    runs.assert_same_training_state(runs.last_state(two_process_reference), runs.last_state(folder), 2)
    assert (two_process_reference / "summary.csv").read_text() == (folder / "summary.csv").read_text()
