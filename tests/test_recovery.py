"""--recovery-interval: a run SIGKILLed mid-epoch and resumed from its latest recovery checkpoint ends with the
weights, EMA, distiller state and summary of the uninterrupted reference run, bit for bit, with 1 and 2
processes (the latter with 2 accumulated micro-batches per update); the last --checkpoint-hist recovery files
are kept. The reference and killed runs (tests/runs.py) are trained once per session. Two processes: the
torchrun restart after a SIGKILL in tests/test_preemption.py, which resumes from the latest recovery file too."""
import re

import pytest
import runs


def resume_from_latest_recovery(nproc, killed, tmp_path):
    folder = runs.copy_run(killed, tmp_path / "killed")
    assert runs.last_state(folder)["epoch"] == 0, "the kill must land in epoch 1"
    steps = runs.STEPS_PER_EPOCH[nproc]
    (epoch, step), latest = max(runs.recovery_positions(folder).items())
    assert epoch == 1 and 0 < step < steps
    out = runs.train(nproc, "--resume", latest)  # the run's own arguments come back
    assert f"continuing at epoch 1 after step {step}" in out
    first_step = re.search(r"Train: 1 \[ *(\d+)/(\d+)", out)
    assert first_step and (int(first_step[1]), int(first_step[2])) == (step + 1, steps)
    return folder


def assert_same_run(nproc, reference, folder):
    runs.assert_same_training_state(runs.last_state(reference), runs.last_state(folder), nproc)
    # The epoch's loss sums come back with the recovery checkpoint, so even the killed epoch's row agrees.
    assert (reference / "summary.csv").read_text() == (folder / "summary.csv").read_text()
    expected = runs.expected_recovery_positions(nproc)
    assert sorted(runs.recovery_positions(reference)) == expected
    assert sorted(runs.recovery_positions(folder)) == expected


@pytest.mark.slow
def test_one_process_killed_between_recovery_checkpoints_matches_uninterrupted(tmp_path, one_process_reference,
                                                                               one_process_killed):
    """CRD: its memory banks, normaliser and step counter (which seeds its negatives) must come back too."""
    folder = resume_from_latest_recovery(1, one_process_killed, tmp_path)
    assert_same_run(1, one_process_reference, folder)
    assert {f"contrast.{n}" for n in ("memory_student", "memory_teacher", "z", "step")} <= set(
        runs.last_state(folder)["distiller_extra"])


@pytest.mark.slow
def test_a_pat_run_killed_between_recovery_checkpoints_matches_uninterrupted(tmp_path, pat_reference, pat_killed):
    """PAT: its prompts (beta included) and the BatchNorm statistics of its aligners and feedback projections come
    back bit for bit; the feedback is the current batch's, so no other state exists to save."""
    folder = resume_from_latest_recovery(1, pat_killed, tmp_path)
    assert_same_run(1, pat_reference, folder)
    extra = runs.last_state(folder)["distiller_extra"]
    assert {"prompts.1.beta", "aligners.1.1.running_mean"} <= set(extra) and extra["prompts.1.beta"] != 0
