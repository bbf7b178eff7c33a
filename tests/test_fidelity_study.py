"""tools/fidelity_study.py: its tiny study end to end, skipping finished runs, the held-out split, the pilot's and
the tuning's decisions, the statistics, the README's figures; the Mixer student; the mixup-pairing study."""
import csv
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import run_cli
from scipy import stats as scipy_stats

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.datasets import build_dataset
from engine.datasets.synthetic import make_synthetic
from engine.loop import format_seconds
from engine.run import build_run
from engine.train_args import build_train_parser
from kdcore.errors import UserError
from kdcore.features import FeatureRequest, extract_features
from kdcore.io import remove_stale_temporaries
from tools import fidelity_study as study
from tools import study_stats
from tools.study_report import cost_lines, read_records, write_table
from tools.study_runs import CACHED_METHODS, MARKER, read_marker, write_marker

TINY_BUDGET_S = 120  # the limit for the tiny mode in the test suite: wall-clock seconds
DEIT, MIXER = "convnext_demo_32-deit_demo_32", "convnext_demo_32-mixer_demo_32"
RESNET = "swin_demo_32-resnet_demo_32"  # part 2's other direction: a token teacher, a BatchNorm CNN student


def test_mixer_demo_parameter_count_by_hand_and_stages():
    """MLP-Mixer: 4 px patch stem + depth x (LN, token MLP over 64 tokens, LN, channel MLP) + LN + head."""
    d, tokens, depth, classes = 96, 64, 6, 10
    token_hidden, channel_hidden = d // 2, 4 * d  # timm's mlp_ratio (0.5, 4.0)
    block = 2 * d + (tokens * token_hidden + token_hidden + token_hidden * tokens + tokens) + 2 * d + (
        d * channel_hidden + channel_hidden + channel_hidden * d + d)
    expected = (3 * 16 * d + d) + depth * block + 2 * d + (d * classes + classes)
    model = timm.create_model("mixer_demo_32").eval()
    assert sum(p.numel() for p in model.parameters()) == expected
    feats = extract_features(model, torch.randn(2, 3, 32, 32), FeatureRequest(stages=(1, 2, 3, 4), embedding=True))
    assert feats.logits.shape == (2, classes) and feats.embedding.shape == (2, d)
    assert [tuple(feats.stages[s].shape[1:]) for s in (1, 2, 3, 4)] == [(tokens, d)] * 4


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, random_demo_teacher):
    """The tiny study (every phase of parts 1 and 2 in their fewest runs, one seed) and its wall seconds. Its
    21 jobs are processes forked from one pre-imported server (tools/study_job.py); as `python train.py` each
    paid about 7 CPU-s of imports first, and the study took 88-183 s on the AVX2-only EPYC (the slowest in CI,
    which failed the 2 minutes), against 88 s forked where the same machine took 167 s as before (2026-12-07).
    This module's tests share this study."""
    out = tmp_path_factory.mktemp("study")
    start = time.time()
    result = run_cli("tools/fidelity_study.py", "--tiny", "--out", out, "--teacher-checkpoint", random_demo_teacher)
    return out, result, time.time() - start


def processes_using(path):
    """The processes whose command line names `path` or that hold a file under it open (a study's job, forked
    from its server, is named by the server's command line, but holds its log open)."""
    path, found = str(path), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                named = path in f.read()
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone meanwhile
            continue
        if named or any(target == path or target.startswith(path + os.sep) for target in targets):
            found.append(pid)
    return found


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_folder(out, row):
    return (out / "runs" / row["pair"] / row["method"] / row["hyperparameters"] /
            f"n{row['train_subset']}_e{row['epochs']}" / f"seed{row['seed']}")


@pytest.mark.slow
def test_tiny_mode_runs_every_phase_within_budget(tiny_study):
    out, result, wall_seconds = tiny_study
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert wall_seconds < TINY_BUDGET_S, f"the tiny study took {wall_seconds:.0f} s"
    rows = read_csv(out / "results.csv")
    assert tuple(rows[0]) == study.RESULT_COLUMNS
    # pilot: scratch at 2 and 4 epochs on both pairs; tuning: scratch and RSD at both values on the Mixer pair;
    # grid: both methods at the chosen values on the three pairs (the Mixer's runs are the tuning's)
    pilot = json.loads((out / "pilot.json").read_text())
    tuning = json.loads((out / "tuning.json").read_text())
    assert pilot["choice"] == {"train_subset": 64, "epochs": 2, "plateaued": True}
    assert set(tuning["methods"]) == {"scratch", "rsd"}
    chosen = {m: f"{t['flag'][2:].replace('-', '_')}={t['chosen']}" for m, t in tuning["methods"].items()}
    grid = sorted((r["pair"], r["method"], r["hyperparameters"]) for r in rows if "grid" in r["roles"].split())
    assert grid == sorted((p, m, chosen[m]) for p in (DEIT, MIXER, RESNET) for m in ("scratch", "rsd"))
    assert sum("pilot" in r["roles"] for r in rows) == 4 and sum("tuning" in r["roles"] for r in rows) == 4
    # part 2: the random-teacher control, RichKD isolated (KD at its T and weight, RichKD (L)), PAT on one pair
    part2 = sorted((r["roles"], r["pair"], r["method"], r["hyperparameters"]) for r in rows
                   if r["roles"] in ("controls", "richkd", "pat"))
    assert part2 == [("controls", "convnext_demo_32_random-deit_demo_32", "kd", "kd_temperature=1.0"),
                     ("pat", DEIT, "pat", "default"),
                     ("richkd", DEIT, "kd", "kd_temperature=3.0,kd_loss_weight=3.0"),
                     ("richkd", DEIT, "richkd", "richkd_mode=L")]
    fusion = json.loads((out / "fusion.json").read_text())
    assert fusion["alpha"] == 0.7 and fusion["images"] == 32 and fusion["source_model"] == "swin_demo_32"
    assert all(0 <= fusion[k] <= 100 for k in ("teacher", "source", "fused"))
    assert len(rows) == len({(r["pair"], r["method"], r["hyperparameters"], r["epochs"]) for r in rows})
    for row in rows:
        folder = run_folder(out, row)
        val = [float(r["eval_top1"]) for r in read_csv(folder / "summary.csv")]
        assert (float(row["val_top1_last"]), float(row["val_top1_best"])) == (val[-1], max(val))
        assert int(row["steps"]) == int(row["epochs"]) * (64 // 16)  # 64 images at batch 16
        test = json.loads((folder / "test.json").read_text())
        assert float(row["test_top1_last"]) == test["last"][0]["top1"] and test["last"][0]["num_samples"] == 32
        args = yaml.safe_load((folder / "args.yaml").read_text())
        assert (args["holdout"], args["train_subset"], args["teacher_precision"]) == (32, 64, "fp32")
        assert bool(args.get("teacher_cache")) == (row["method"] in CACHED_METHODS)  # not scratch, not PAT
        assert float(row["wall_s"]) > 0 and row["cpu"] and row["date"] == datetime.date.today().isoformat()
    wall = json.loads((out / "wall.json").read_text())
    assert len(wall["invocations"]) == 1 and 0 < wall["total_s"] == wall["invocations"][0]["wall_s"]
    table = (out / "table.md").read_text()
    assert re.search(r"\| scratch \| [\d.]+ \(n=1\) \| [\d.]+ \(n=1\) \|", table)
    for png in ("top1.png", f"cka_{DEIT}.png", f"cka_{MIXER}.png", f"cka_{RESNET}.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    cka = json.loads((out / f"cka_{RESNET}.json").read_text())
    assert cka["teacher"] == "swin_demo_32" and cka["summary"]["seeds"] == [0]
    assert set(cka["summary"]["aad"]) == {"rsd"} and cka["student_layers"]["rsd"][-1] == "AAD(embedding)"
    assert "Controls on ConvNeXt -> DeiT" in table and "RichKD isolated on ConvNeXt -> DeiT" in table


@pytest.mark.slow
def test_second_invocation_skips_finished_runs(tiny_study, random_demo_teacher):
    out, first, *_ = tiny_study
    assert first.returncode == 0, first.stderr[-3000:]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/*/seed0/last.pth.tar")}
    results = (out / "results.csv").read_text()
    again = run_cli("tools/fidelity_study.py", "--tiny", "--out", out, "--teacher-checkpoint", random_demo_teacher,
                    "--cka-images", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stdout
    assert len(stamps) == 15 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "results.csv").read_text() == results
    assert len(json.loads((out / "wall.json").read_text())["invocations"]) == 2


@pytest.mark.slow
def test_results_csv_alone_carries_the_study_to_another_sitting(tiny_study, random_demo_teacher, tmp_path):
    """On a machine without the run folders, the committed results.csv is the ledger: nothing trains again, the
    decisions and every row come out the same, and the CKA maps are skipped for want of checkpoints."""
    out, first, *_ = tiny_study
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "results.csv").write_text((out / "results.csv").read_text())
    again = run_cli("tools/fidelity_study.py", "--tiny", "--out", tmp_path, "--teacher-checkpoint",
                    random_demo_teacher)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stdout and not (tmp_path / "runs").exists()
    assert "CKA maps of convnext_demo_32-deit_demo_32 skipped" in again.stdout
    assert read_csv(tmp_path / "results.csv") == read_csv(out / "results.csv")
    for record in ("pilot.json", "tuning.json"):
        assert json.loads((tmp_path / record).read_text()) == json.loads((out / record).read_text())


@pytest.mark.slow
def test_sigterm_stops_the_study_and_its_runs_and_the_same_command_resumes(tiny_study, random_demo_teacher,
                                                                            tmp_path):
    """A real SIGTERM to the study while its first pilot runs train: it exits 75 within seconds, no train.py of
    it is left, and the same command then finishes the pilot with the figures of the uninterrupted study."""
    out, first, *_ = tiny_study
    assert first.returncode == 0, first.stderr[-3000:]
    command = [sys.executable, os.path.join(study.REPO, "tools", "fidelity_study.py"), "--tiny", "--out",
               str(tmp_path), "--teacher-checkpoint", random_demo_teacher, "--until", "pilot"]
    env = dict(os.environ, PYTHONPATH=study.REPO, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=study.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/*/*/*/seed0/summary.csv")) and time.time() < deadline:
        time.sleep(0.2)  # an epoch of a run is on disk: the run is past its start-up
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 75 and "run the same command again" in err, err[-2000:]
    assert not processes_using(tmp_path)
    assert not (tmp_path / "pilot.json").exists() or not json.loads((tmp_path / "pilot.json").read_text())["levels"]
    again = subprocess.run(command, cwd=study.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resum" in "".join(p.read_text() for p in tmp_path.glob("runs/*/*/*/*/seed0/log.txt")).lower()
    figures = ("pair", "hyperparameters", "epochs", "steps", "val_top1_last", "val_top1_best", "test_top1_last")
    resumed = [{k: r[k] for k in figures} for r in read_csv(tmp_path / "results.csv")]
    whole = [{k: r[k] for k in figures} for r in read_csv(out / "results.csv") if "pilot" in r["roles"].split()]
    assert sorted(resumed, key=str) == sorted(whole, key=str) and len(resumed) == 4


@pytest.mark.slow
def test_same_command_gives_the_same_weights(tiny_study, tmp_path):
    """A run's train.py command, started again in another folder, trains the same weights bit for bit."""
    out, first, *_ = tiny_study
    assert first.returncode == 0, first.stderr[-3000:]
    [row] = [r for r in read_csv(out / "results.csv") if r["pair"] == DEIT and r["method"] == "rsd"]
    command = yaml.safe_load((run_folder(out, row) / "args.yaml").read_text())
    again = run_cli("train.py", "-c", study.CONFIG, *study.TINY_TRAIN_ARGS, "--model", "deit_demo_32",
                    "--distiller", "rsd", "--seed", "0", "--train-subset", "64", "--epochs", row["epochs"],
                    "--rsd-loss-weight", str(command["rsd_loss_weight"]), "--teacher-pretrained",
                    command["teacher_pretrained"], "--teacher-cache", command["teacher_cache"],
                    "--output", tmp_path, "--experiment", "again")
    assert again.returncode == 0, again.stderr[-3000:]
    weights = torch.load(run_folder(out, row) / "student_last.pth", weights_only=True)
    repeated = torch.load(tmp_path / "again" / "student_last.pth", weights_only=True)
    assert weights.keys() == repeated.keys() and all(torch.equal(weights[k], repeated[k]) for k in weights)


def test_a_run_starting_in_its_folder_leaves_the_studys_marker_write_alone(tmp_path, monkeypatch):
    """The study's heartbeat writes its marker into the run's folder while the run starts there, and a starting
    run removes the '*.tmp' files a kill left (engine/run.py): the marker's temporary file must not be one.
    (It was: the study died of a FileNotFoundError in CI on a slow CPU, when the two met.)"""
    folder = tmp_path / "run"
    folder.mkdir()
    stale = folder / "last.pth.tar.tmp"  # what a killed run leaves, and a starting one removes
    stale.write_bytes(b"partial")
    flag = tmp_path / "marker_write_held"
    monkeypatch.setenv("KD_TEST_PAUSE_WRITE", f"{MARKER}:{flag}")
    errors = []

    def heartbeat():
        try:
            write_marker(str(folder), {"wall_s": 10.0})
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    writer = threading.Thread(target=heartbeat)
    writer.start()
    deadline = time.time() + 30
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert flag.exists(), "the marker's write never started"
    remove_stale_temporaries(str(folder))  # the run starts while the marker's bytes are being written
    flag.unlink()
    writer.join(timeout=30)
    assert errors == []
    assert read_marker(str(folder)) == {"wall_s": 10.0}
    assert not stale.exists()
    assert sorted(p.name for p in folder.iterdir()) == [MARKER]


def test_seed_changes_initialisation_and_data_order_not_the_subset(tmp_path):
    """What train.py builds for --seed 0, 0 and 1 on a --train-subset: the student's initial weights and the
    epoch's order follow the seed, the images trained on do not (and they are class-balanced)."""
    def build(seed, name):
        argv = ["--dataset", "synthetic", "--synthetic-train-size", "128", "--train-subset", "64", "-b", "16",
                "--workers", "0", "--img-size", "32", "--model", "deit_demo_32", "--seed", str(seed),
                "--output", str(tmp_path), "--experiment", name]
        run = build_run(parse_args_with_config(build_train_parser(DISTILLERS), argv))
        run.writer.close()
        subset = run.data.train_loader.dataset  # unwrap the loader's dataset wrappers down to the subset
        while not hasattr(subset, "indices"):
            subset = subset.dataset
        order = [int(subset.indices[i]) for views in run.data.train_loader for i in views.index]
        return run.student.state_dict(), order

    weights0, order0 = build(0, "a")
    weights0_again, order0_again = build(0, "b")
    weights1, order1 = build(1, "c")
    assert all(torch.equal(weights0[k], weights0_again[k]) for k in weights0) and order0 == order0_again
    assert not all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert order0 != order1 and sorted(order0) == sorted(order1) and len(set(order0)) == 64
    labels = make_synthetic("train", 128, 10).labels[order0]
    assert sorted(np.bincount(labels, minlength=10)) == [6] * 6 + [7] * 4  # 64 = 10 x 6 + 4


def test_the_study_config_holds_out_a_disjoint_balanced_validation_split(fashion_mnist):
    """The committed config on the real Fashion-MNIST: the held-out validation split and the training subset
    are disjoint, class-balanced, and the same whatever --seed or --train-subset-seed (for the split)."""
    values = yaml.safe_load(open(study.CONFIG))
    args = SimpleNamespace(holdout=values["holdout"], train_subset=values["train_subset"], train_subset_seed=0)
    train = build_dataset("fashion_mnist", "", "train", args)
    val = build_dataset("fashion_mnist", "", "val", args)
    held, trained = set(val.indices.tolist()), set(train.indices.tolist())
    assert len(held) == values["holdout"] and len(trained) == values["train_subset"] and not held & trained
    assert np.bincount(val.labels).tolist() == [values["holdout"] // 10] * 10
    assert np.bincount(train.labels).tolist() == [values["train_subset"] // 10] * 10
    other = build_dataset("fashion_mnist", "", "val", SimpleNamespace(holdout=values["holdout"], train_subset=500,
                                                                       train_subset_seed=3))
    assert other.indices.tolist() == val.indices.tolist()
    test = build_dataset("fashion_mnist", "", "val", SimpleNamespace())
    assert len(test) == 10000  # without --holdout, the test set


def test_holdout_leaves_the_rest_to_train_on_and_refuses_too_many():
    args = SimpleNamespace(holdout=30, synthetic_train_size=100, synthetic_val_size=20, synthetic_seed=0,
                           num_classes=None)
    train, val = build_dataset("synthetic", "", "train", args), build_dataset("synthetic", "", "val", args)
    assert len(train) == 70 and sorted(train.indices.tolist() + val.indices.tolist()) == list(range(100))
    with pytest.raises(UserError, match="--train-subset 71 must lie between 1 and the 70 training images"):
        build_dataset("synthetic", "", "train",
                      SimpleNamespace(**dict(vars(args), train_subset=71, train_subset_seed=0)))
    with pytest.raises(UserError, match="--holdout 101"):
        build_dataset("synthetic", "", "val", SimpleNamespace(**dict(vars(args), holdout=101)))


class FakeProgress(study.Progress):
    """The study's decisions on made-up validation figures: every run counts as done, nothing trains."""

    def __init__(self, plan, val):
        values = {"batch_size": 50, "holdout": 100, "lr": 1e-3}
        stub = study.Study("cfg", "/nonexistent", {"teacher": ("t", "t.pth")}, cache_student="s", data_args=[])
        super().__init__(stub, plan, "teacher", values, build_train_parser(DISTILLERS), jobs=1, train=False)
        self.val, self.asked = val, []

    def run(self, runs, role):
        self.asked += [(role, r) for r in runs]
        return True

    def write(self):
        pass

    def val_last(self, run):
        return self.val(run)


PLAN = study.Plan(students=("a", "b"), methods=("scratch", "kd"), pilot_subsets=(1000, 500), pilot_seeds=(0, 1),
                  pilot_levels=3, plateau_gain=0.3, step_cap=400, tuning=study.TUNING, tuning_student="b",
                  tuning_seeds=(0,), grid_seeds=(0, 1, 2))


def test_pilot_takes_the_first_level_whose_doubling_gains_under_the_threshold():
    """1000 images at batch 50: 20 steps an epoch, 20 epochs within the 400-step cap: E = 5, 10, 20. Top-1 grows
    by 1 point an epoch up to 12 epochs, then stays: 5 -> 10 gains 5, 10 -> 20 gains 2, 20 -> 40 gains 0."""
    progress = FakeProgress(PLAN, lambda run: 50.0 + min(run.epochs, 12))
    assert study.pilot_phase(progress) == {"train_subset": 1000, "epochs": 20, "plateaued": True}
    levels = progress.pilot["levels"]
    assert [(lv["epochs"], lv["check_epochs"], lv["steps"], lv["plateau"]) for lv in levels] == [
        (5, 10, 100, False), (10, 20, 200, False), (20, 40, 400, True)]
    assert levels[1]["gain"] == {"teacher-a": 2.0, "teacher-b": 2.0}
    assert {r.seed for _, r in progress.asked} == {0, 1} and {r.method for _, r in progress.asked} == {"scratch"}


def test_pilot_needs_every_student_and_the_mean_of_the_seeds():
    """Student a plateaus at once; b gains 0.5 on seed 0 and 0 on seed 1 (mean 0.25 < 0.3) only from E = 10."""
    def val(run):
        if run.student == "a":
            return 70.0
        return 60.0 + (min(run.epochs, 10) if run.seed == 1 else min(run.epochs, 10.5))
    progress = FakeProgress(PLAN, val)
    assert study.pilot_phase(progress) == {"train_subset": 1000, "epochs": 10, "plateaued": True}
    assert progress.pilot["levels"][-1]["gain"] == {"teacher-a": 0.0, "teacher-b": 0.25}


def test_pilot_shrinks_the_subset_then_proceeds_unplateaued_where_it_came_closest():
    """Never plateaus: both sizes are tried (500 images: 10 steps an epoch, E = 10, 20, 40). Top-1 grows by
    log2 of the steps, twice as fast with 500 images: each size's largest E gains 1 (1000) and 2 (500) points, so
    the choice is 1000 images at 20 epochs, recorded as not plateaued; with the rates swapped, 500 at 40."""
    def val(rate_1000, rate_500):
        return lambda run: (rate_1000 if run.train_subset == 1000 else rate_500) * math.log2(
            run.epochs * run.train_subset)
    progress = FakeProgress(PLAN, val(1.0, 2.0))
    assert study.pilot_phase(progress) == {"train_subset": 1000, "epochs": 20, "plateaued": False}
    assert [(lv["train_subset"], lv["epochs"]) for lv in progress.pilot["levels"]] == [
        (1000, 5), (1000, 10), (1000, 20), (500, 10), (500, 20), (500, 40)]
    assert study.pilot_phase(FakeProgress(PLAN, val(2.0, 1.0))) == {"train_subset": 500, "epochs": 40,
                                                                    "plateaued": False}


def test_tuning_keeps_the_default_on_a_tie_and_takes_a_better_alternative():
    """scratch's lr 2e-3 scores higher; KD at T = 4 ties with T = 1, so T stays 1; the grid uses the choices."""
    def val(run):
        return 80.0 if run.setting == (("lr", 2e-3),) else 70.0
    progress = FakeProgress(PLAN, val)
    schedule = {"train_subset": 1000, "epochs": 10}
    chosen = study.tuning_phase(progress, schedule)
    assert chosen == {"scratch": (("lr", 2e-3),), "kd": (("kd_temperature", 1.0),)}
    assert progress.tuning["methods"]["kd"] == {"flag": "--kd-temperature", "default": 1.0, "alternative": 4.0,
                                                "val_top1": {"default": 70.0, "alternative": 70.0}, "chosen": 1.0}
    assert {r.student for _, r in progress.asked} == {"b"}
    grid = study.grid_phase(progress, schedule, chosen, progress.grid_pairs())
    assert len(grid) == 2 * 2 * 3 and {r.setting for r in grid if r.method == "kd"} == {(("kd_temperature", 1.0),)}
    assert [r.seed for r in grid[:4]] == [0] * 4  # seed-major: an early stop leaves whole seeds


def test_paired_statistics_equal_scipy_and_a_hand_holm():
    a = {0: 75.1, 1: 74.2, 2: 76.0, 3: 75.5, 4: 74.9}
    b = {0: 73.0, 1: 73.9, 2: 74.1, 3: 73.2, 4: 74.0, 5: 99.0}  # seed 5 has no partner: left out
    d = np.array([a[s] - b[s] for s in range(5)])
    result = study_stats.paired_difference(a, b)
    half = scipy_stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert result["n"] == 5 and result["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert (result["low"], result["high"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
    assert result["p"] == pytest.approx(scipy_stats.ttest_rel([a[s] for s in range(5)],
                                                              [b[s] for s in range(5)]).pvalue, rel=1e-12)
    # Holm by hand: sorted 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1 = 0.04, 0.06, 0.08, 0.30 (monotone already);
    # a larger raw p never gets a smaller adjusted one
    assert study_stats.holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert study_stats.holm([0.01, 0.011, 0.5]) == pytest.approx([0.03, 0.03, 0.5])  # 0.011 x 2 lifted to 0.03
    assert study_stats.holm([0.2, float("nan")])[0] == 0.2 and np.isnan(study_stats.holm([0.2, float("nan")])[1])


def test_cost_table_gives_median_wall_per_cpu_and_their_ratio():
    """Median wall time per run by student, method and CPU at the grid's schedule, and the slower CPU's median
    over the faster's on the kinds both ran; runs at another schedule (the pilot's) stay out."""
    def row(method, cpu, wall, epochs="24", roles="grid"):
        return {"pair": "t-deit_demo_32", "method": method, "cpu": cpu, "wall_s": str(wall), "train_subset": "2000",
                "epochs": epochs, "roles": roles}
    rows = [row("kd", "A", 100), row("kd", "A", 120), row("kd", "A", 500), row("kd", "B", 150, roles="controls"),
            row("kd", "B", 999, epochs="12", roles="pilot"), row("rsd", "A", 90)]
    lines = cost_lines(rows)
    assert "| deit_demo_32 | kd | A | 3 | 120 |" in lines and "| deit_demo_32 | kd | B | 1 | 150 |" in lines
    assert "| deit_demo_32 | rsd | A | 1 | 90 |" in lines
    assert "| deit_demo_32 | kd | A | B | 1.25 |" in lines  # 150 / median(100, 120, 500)
    assert not any("| rsd | A | B |" in line for line in lines)


def fidelity_section():
    readme = open(os.path.join(study.REPO, "README.md")).read()
    start = readme.index("### Fidelity study")
    return readme[start:readme.index("\n## ", start)]


def test_readme_figures_are_the_committed_results(tmp_path):
    """The README's fidelity section quotes results/fidelity: each of its table rows is a row of the table
    regenerated here from the committed results.csv, pilot.json, tuning.json, fusion.json and CKA summaries; each
    decimal figure of its prose is in that table; the study's wall time is wall.json's; grid cells agree with
    numpy on the raw rows."""
    results = os.path.join(study.REPO, "results", "fidelity")
    rows = read_csv(os.path.join(results, "results.csv"))
    records = {name: json.loads(open(os.path.join(results, f"{name}.json")).read()) for name in ("pilot", "tuning")}
    write_table(rows, records["pilot"], records["tuning"], tmp_path / "table.md", *read_records(results))
    table = (tmp_path / "table.md").read_text()
    assert table == open(os.path.join(results, "table.md")).read()
    section = fidelity_section()
    quoted = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method |")]
    assert quoted and all(line in table.splitlines() for line in quoted), [q for q in quoted if q not in table]
    prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
    prose = re.sub(r"`[^`]*`|\([^()]*\.(?:csv|json|md|png|py|yaml)\)", "", prose)  # code and file names
    for figure in re.findall(r"(?<![\w.])[+-]?\d+\.\d+(?![\w.])", prose):
        assert figure in table, f"the README's fidelity section quotes {figure}, which the results do not give"
    wall = json.loads(open(os.path.join(results, "wall.json")).read())
    assert f"{format_seconds(wall['total_s'])} of the tool's wall-clock time" in prose
    grid = [r for r in rows if "grid" in r["roles"].split()]
    for (pair, method) in {(r["pair"], r["method"]) for r in grid}:
        values = np.array([float(r["test_top1_last"]) for r in grid if (r["pair"], r["method"]) == (pair, method)])
        if len(values) > 1:
            assert f"| {method} |" in table and f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" in table


@pytest.mark.slow
def test_the_mixup_pairing_study_tabulates_both_pairings(tmp_path):
    """tools/mixup_pairing_study.py --tiny: one run per pairing through the study's runner, one row each."""
    from tools.mixup_pairing_study import main as pairing_main
    rows = pairing_main(["--tiny", "--out", str(tmp_path)])
    assert sorted(r["pairing"] for r in rows) == ["batch", "sample"]
    with open(tmp_path / "results.csv", newline="") as f:
        assert [r["pairing"] for r in csv.DictReader(f)] == ["batch", "sample"]
    [args_path] = (tmp_path / "sample").glob("runs/convnext_demo_32-deit_demo_32/rsd/default/*/seed0/args.yaml")
    args = yaml.safe_load(args_path.read_text())
    assert (args["mixup_pairing"], args["mixup"], args["cutmix"]) == ("sample", 0.8, 1.0)
    assert "| sample |" in (tmp_path / "table.md").read_text()
