#!/usr/bin/env python3
"""The fidelity study: distillation methods x cross-architecture pairs x seeds, under a protocol that holds.

    python tools/fidelity_study.py                       # pilot, tuning, grid; again to resume (finished runs skip)
    python tools/fidelity_study.py --until pilot         # stop after the pilot's choice
    python tools/fidelity_study.py --aggregate-only      # rebuild the records, table and plot from the runs
    python tools/fidelity_study.py --tiny --out /tmp/s   # every phase in a few steps on synthetic data (tests)

Both pairs start from the config's teacher (the shipped ConvNeXt-style convnext_demo_32): one to the DeiT-style
deit_demo_32, one to the MLP-Mixer-style mixer_demo_32. The recipe lives in configs/study/fidelity.yaml, with its
`holdout`: a fixed class-balanced validation split of Fashion-MNIST training images, disjoint from the training
subset and the same for every run, on which every choice is made. The test set scores each final model once: its
last epoch, and the checkpoint its validation top-1 selected.

1. Pilot: scratch on every student with the plan's pilot seeds, at E and 2E epochs for E = base, 2 base, 4 base
   (4 base: the most epochs within the step cap). Scratch has plateaued at E when its 2E run gains less than the
   plan's plateau gain (0.3 points of validation top-1, the mean over seeds) on every student. The first E that
   plateaus, on the first training-subset size where one does, sets every later run's subset and epochs; when
   none does, the size whose largest E came closest (the smallest gain of its worst student), recorded as not
   plateaued.
2. Tuning: each method at its default and one alternative value, on the tuning student's pair and seeds; the
   higher validation top-1 wins (a tie keeps the default), then is fixed for every pair and seed.
3. Grid: every method at its chosen value on every pair, for the grid seeds (initialisation and augmentation).
KD, DKD, OFA and RSD read the teacher from a cache per seed (tools/build_cache.py), built before their runs.
`--jobs` runs share the machine, one thread each. Under --out, rewritten as runs finish: results.csv (a row per
run), pilot.json, tuning.json, table.md (cells, paired differences with Holm-corrected p), top1.png (our gains
beside the paper's) and, at the end, the CKA maps of seed 0 (tools/cka.py).
"""
import argparse
import csv
import datetime
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass

import timm
import torch

import custom_model  # noqa: F401  (registers the demo students with timm before --students is checked)
from distillers import DISTILLERS
from engine.config import load_config
from engine.loop import format_seconds
from engine.train_args import build_train_parser
from engine.weights import read_checkpoint
from kdcore.errors import EXIT_PREEMPTED, UserError, exit_cleanly_on_error
from kdcore.io import atomic_write_csv, atomic_write_json
from kdcore.machine import cpu_model_name
from tools.cka import main as cka_main
from tools.study_report import write_report
from tools.study_runs import (
    METHODS,
    TEST_SCORES,
    RunSpec,
    Study,
    epoch_rows,
    has_run_folder,
    is_done,
    read_marker,
    row_key,
    run_jobs,
    setting_text,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "study", "fidelity.yaml")
CKA_METHODS = ("scratch", "kd", "ofa", "rsd")
RESULT_COLUMNS = ("pair", "method", "hyperparameters", "seed", "train_subset", "holdout", "epochs", "steps",
                  "val_top1_last", "val_top1_best", "best_epoch", "test_top1_last", "test_top1_selected",
                  "wall_s", "cpu", "date", "roles")


@dataclass(frozen=True)
class Plan:
    """What the study runs: its students (one pair each), methods, pilot, tuning and grid."""

    students: tuple
    methods: tuple
    pilot_subsets: tuple  # training-subset sizes, tried in order until scratch plateaus within the cap
    pilot_seeds: tuple
    pilot_levels: int  # E = base * 2**k, k < levels, the largest within step_cap
    plateau_gain: float  # validation top-1 points that 2E may gain over E at a plateau
    step_cap: int  # optimizer steps of a run at E (the pilot's 2E runs take up to twice as many)
    tuning: dict  # method -> (train.py dest, the alternative to its default)
    tuning_student: str
    tuning_seeds: tuple
    grid_seeds: tuple


TUNING = {"scratch": ("lr", 2e-3), "kd": ("kd_temperature", 4.0), "dkd": ("dkd_beta", 8.0),
          "ofa": ("ofa_eps", 1.5), "rsd": ("rsd_loss_weight", 0.4)}
FULL_PLAN = Plan(students=("deit_demo_32", "mixer_demo_32"), methods=("scratch", "kd", "dkd", "ofa", "rsd"),
                 pilot_subsets=(2000, 1000), pilot_seeds=(0, 1), pilot_levels=3, plateau_gain=0.3, step_cap=750,
                 tuning=TUNING, tuning_student="mixer_demo_32", tuning_seeds=(0,), grid_seeds=(0, 1, 2, 3, 4))
# --tiny: two methods, one seed, 64 generated images at batch 16 (4 steps an epoch), 2 and 4 epochs
TINY_PLAN = Plan(students=("deit_demo_32", "mixer_demo_32"), methods=("scratch", "rsd"), pilot_subsets=(64,),
                 pilot_seeds=(0,), pilot_levels=1, plateau_gain=math.inf, step_cap=8, tuning=TUNING,
                 tuning_student="mixer_demo_32", tuning_seeds=(0,), grid_seeds=(0,))
TINY_BATCH, TINY_HOLDOUT = 16, 32
TINY_TRAIN_ARGS = ["--dataset", "synthetic", "--synthetic-train-size", "128", "--synthetic-val-size", "32",
                   "--holdout", str(TINY_HOLDOUT), "-b", str(TINY_BATCH), "--workers", "0", "--log-interval", "1",
                   "--warmup-epochs", "0"]
TINY_DATA_ARGS = ["--dataset", "synthetic"]
TINY_CKA_IMAGES = 16


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG, help="train.py YAML config holding the recipe and the teacher")
    p.add_argument("--out", default="", help="study folder (default: the config's `output`)")
    p.add_argument("--teacher-checkpoint", default="", help="default: the config's teacher_pretrained")
    p.add_argument("--until", default="grid", choices=("pilot", "tuning", "grid"), help="the last phase to run")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--cka-images", type=int, default=500, help="validation images per CKA map (0: no maps)")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; rebuild the outputs")
    p.add_argument("--tiny", action="store_true", help="every phase in a few steps on synthetic data")
    return p


def pair_name(teacher, student):
    return f"{teacher}-{student}"


def default_value(values, parser, dest):
    """A flag's value in the study's config, else train.py's default (a one-value list read as its value)."""
    value = values[dest] if dest in values else parser.get_default(dest)
    return value[0] if isinstance(value, list) and len(value) == 1 else value


class Progress:
    """The study's state: its settings, every run's roles, the phases' records; writes the outputs."""

    def __init__(self, study, plan, teacher, values, parser, jobs, train):
        self.study, self.plan, self.teacher, self.jobs, self.train = study, plan, teacher, jobs, train
        self.batch, self.holdout = values["batch_size"], values.get("holdout")
        self.defaults = {m: (dest, default_value(values, parser, dest)) for m, (dest, _) in plan.tuning.items()}
        self.roles, self.pilot, self.tuning = {}, None, None
        self.finished = {}  # run key -> its row without roles: a finished run's figures never change
        self.started = time.time()
        self.invocation = {"start": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model_name()}

    def pair(self, student):
        return pair_name(self.teacher, student)

    def spec(self, student, method, setting, size, epochs, seed):
        return RunSpec(self.pair(student), student, method, setting, size, epochs, seed)

    def default_setting(self, method):
        return (self.defaults[method],) if method in self.defaults else ()

    def run(self, runs, role):
        """Train what is missing of `runs` (unless aggregating); whether all are done."""
        for run in runs:
            self.roles.setdefault(run.folder(self.study.out), (run, set()))[1].add(role)
        if self.train:
            run_jobs(self.study, runs, self.jobs, on_done=lambda job, wall: self.write(), on_tick=self.log_wall)
        self.write()
        return all(is_done(self.study, run) for run in runs)

    def val_last(self, run):
        if has_run_folder(self.study, run):
            return float(epoch_rows(run.folder(self.study.out))[-1]["eval_top1"])
        return float(self.study.ledger[run.key()]["val_top1_last"])

    def rows(self):
        """A row per run finished here or in the ledger: the ledger's rows kept, those of this invocation's runs
        with their roles now."""
        rows = dict(self.study.ledger)
        for run, roles in self.roles.values():
            if run.key() in self.finished or has_run_folder(self.study, run):
                if run.key() not in self.finished:
                    self.finished[run.key()] = result_row(self.study, run, self.holdout)
                rows[run.key()] = dict(self.finished[run.key()], roles=" ".join(sorted(roles, key=PHASES.index)))
            elif run.key() in rows:
                earlier = set(rows[run.key()]["roles"].split())
                rows[run.key()] = dict(rows[run.key()], roles=" ".join(sorted(earlier | roles, key=PHASES.index)))
        return list(rows.values())

    def log_wall(self):
        """wall.json: the wall time of every invocation that trained, this one's kept current."""
        path = os.path.join(self.study.out, WALL_LOG)
        log = {"invocations": []}
        if os.path.isfile(path):
            with open(path) as f:
                log = json.load(f)
        entries = [e for e in log["invocations"] if e["start"] != self.invocation["start"]]
        entries.append(dict(self.invocation, wall_s=round(time.time() - self.started, 1)))
        atomic_write_json({"invocations": entries, "total_s": round(sum(e["wall_s"] for e in entries), 1)}, path)

    def write(self):
        out = self.study.out
        if self.train:
            self.log_wall()
        rows = sorted(self.rows(), key=lambda r: (r["pair"], list(METHODS).index(r["method"]), r["hyperparameters"],
                                                  int(r["train_subset"]), int(r["epochs"]), int(r["seed"])))
        atomic_write_csv(rows, os.path.join(out, "results.csv"), RESULT_COLUMNS)
        if self.pilot is not None:
            atomic_write_json(self.pilot, os.path.join(out, "pilot.json"))
        if self.tuning is not None:
            atomic_write_json(self.tuning, os.path.join(out, "tuning.json"))
        write_report(rows, self.pilot, self.tuning, out)


def read_ledger(path):
    """{run key: row} of a results.csv (a finished run's record, enough to skip it and to decide on it)."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {row_key(row): row for row in csv.DictReader(f)}


def result_row(study, run, holdout):
    folder = run.folder(study.out)
    epochs = epoch_rows(folder)
    val = [float(row["eval_top1"]) for row in epochs]
    marker = read_marker(folder)
    with open(os.path.join(folder, TEST_SCORES)) as f:
        test = json.load(f)
    return {"pair": run.pair, "method": run.method, "hyperparameters": setting_text(run.setting), "seed": run.seed,
            "train_subset": run.train_subset, "holdout": holdout, "epochs": run.epochs,
            "steps": read_checkpoint(os.path.join(folder, "last.pth.tar"))["global_step"],
            "val_top1_last": val[-1], "val_top1_best": max(val), "best_epoch": val.index(max(val)),
            "test_top1_last": test["last"][0]["top1"], "test_top1_selected": test["best"][0]["top1"],
            "wall_s": round(marker.get("wall_s", math.nan), 1), "cpu": marker.get("cpu", ""),
            "date": marker.get("date", "")}


PHASES = ("pilot", "tuning", "grid")
WALL_LOG = "wall.json"  # the study tool's own wall-clock time, per invocation that trained


def candidate_epochs(size, batch, plan):
    """E = base, 2 base, ... (plan.pilot_levels of them), the largest the most epochs within the step cap."""
    steps_per_epoch = size // batch
    if steps_per_epoch < 1:
        raise UserError(f"--train-subset {size} is smaller than the batch size {batch}")
    top = plan.step_cap // steps_per_epoch
    base = top // 2 ** (plan.pilot_levels - 1)
    if base < 1:
        raise UserError(f"the step cap {plan.step_cap} allows {top} epochs of {size} images at batch {batch}, "
                        f"too few for {plan.pilot_levels} pilot levels")
    return [base * 2 ** k for k in range(plan.pilot_levels)]


def pilot_phase(progress):
    """The pilot's levels and its choice of (training subset, epochs); None when runs are missing."""
    plan, levels = progress.plan, []
    record = {"rule": f"scratch has plateaued at E epochs when its 2E-epoch run gains less than {plan.plateau_gain} "
                      f"points of validation top-1 (the mean over seeds {list(plan.pilot_seeds)}) on every student",
              "step_cap": plan.step_cap, "batch_size": progress.batch, "levels": levels, "choice": None}
    progress.pilot = record
    for size in plan.pilot_subsets:
        for epochs in candidate_epochs(size, progress.batch, plan):
            runs = {(s, e, seed): progress.spec(s, "scratch", progress.default_setting("scratch"), size, e, seed)
                    for s in plan.students for e in (epochs, 2 * epochs) for seed in plan.pilot_seeds}
            if not progress.run(list(runs.values()), "pilot"):
                return None
            gains = {s: statistics.mean(progress.val_last(runs[s, 2 * epochs, seed]) -
                                        progress.val_last(runs[s, epochs, seed]) for seed in plan.pilot_seeds)
                     for s in plan.students}
            plateau = all(gain < plan.plateau_gain for gain in gains.values())
            levels.append({"train_subset": size, "epochs": epochs, "check_epochs": 2 * epochs,
                           "steps": epochs * (size // progress.batch),
                           "gain": {progress.pair(s): round(g, 3) for s, g in gains.items()}, "plateau": plateau})
            if plateau:
                record["choice"] = {"train_subset": size, "epochs": epochs, "plateaued": True}
                return record["choice"]
    tops = [max((lv for lv in levels if lv["train_subset"] == size), key=lambda lv: lv["epochs"])
            for size in plan.pilot_subsets]
    closest = min(tops, key=lambda lv: max(lv["gain"].values()))  # the first size's on a tie
    record["choice"] = {"train_subset": closest["train_subset"], "epochs": closest["epochs"], "plateaued": False}
    return record["choice"]


def tuning_phase(progress, schedule):
    """{method: setting} chosen on the validation split; None when runs are missing."""
    plan = progress.plan
    size, epochs = schedule["train_subset"], schedule["epochs"]
    tuned = [m for m in plan.methods if m in plan.tuning]
    candidates = {m: [progress.defaults[m], (plan.tuning[m][0], plan.tuning[m][1])] for m in tuned}
    runs = {(m, k, seed): progress.spec(plan.tuning_student, m, (candidates[m][k],), size, epochs, seed)
            for m in tuned for k in (0, 1) for seed in plan.tuning_seeds}
    record = {"pair": progress.pair(plan.tuning_student), "seeds": list(plan.tuning_seeds),
              "metric": "validation top-1 at the last epoch (mean over the seeds); a tie keeps the default",
              "methods": {}}
    progress.tuning = record
    if not progress.run(list(runs.values()), "tuning"):
        return None
    chosen = {}
    for m in tuned:
        scores = [statistics.mean(progress.val_last(runs[m, k, seed]) for seed in plan.tuning_seeds) for k in (0, 1)]
        k = 1 if scores[1] > scores[0] else 0
        chosen[m] = (candidates[m][k],)
        dest = candidates[m][0][0]
        record["methods"][m] = {"flag": "--" + dest.replace("_", "-"), "default": candidates[m][0][1],
                                "alternative": candidates[m][1][1], "val_top1": {"default": scores[0],
                                                                                 "alternative": scores[1]},
                                "chosen": candidates[m][k][1]}
    return chosen


def grid_phase(progress, schedule, chosen):
    plan = progress.plan
    runs = [progress.spec(s, m, chosen.get(m, progress.default_setting(m)), schedule["train_subset"],
                          schedule["epochs"], seed)
            for seed in plan.grid_seeds for s in plan.students for m in plan.methods]
    return runs if progress.run(runs, "grid") else None


def cka_maps(progress, grid_runs, teacher_checkpoint, images):
    """cka_<pair>.png: CKA of the teacher against the CKA_METHODS students of the first grid seed."""
    seed = progress.plan.grid_seeds[0]
    for student in progress.plan.students:
        found = [r for r in grid_runs if r.student == student and r.seed == seed and r.method in CKA_METHODS]
        missing = [r.label() for r in found if not has_run_folder(progress.study, r)]
        if not found or missing:  # finished in another sitting, elsewhere: its checkpoint is not here
            print(f"CKA maps of {progress.pair(student)} skipped: no checkpoint here of {'; '.join(missing)}",
                  flush=True)
            continue
        out = progress.study.out
        pair = progress.pair(student)
        cka_main(["--teacher", progress.teacher, "--teacher-checkpoint", teacher_checkpoint, "--images", str(images),
                  "--batch-size", str(min(100, images)), "--workers", "0",
                  "--student-checkpoint", *[os.path.join(r.folder(out), "last.pth.tar") for r in found],
                  "--labels", *[r.method for r in found], "--output", os.path.join(out, f"cka_{pair}.png"),
                  "--json", os.path.join(out, f"cka_{pair}.json")])


def study_settings(opts):
    """(config path, its values, out folder, teacher, teacher checkpoint) from the options and the config."""
    config = os.path.abspath(opts.config)
    parser = build_train_parser(DISTILLERS)
    values, _ = load_config(parser, config)
    teacher = values.get("teacher")
    if not teacher:
        raise UserError(f"config {opts.config!r} names no teacher (key `teacher`); the study distils from it")
    if not values.get("holdout") and not opts.tiny:
        raise UserError(f"config {opts.config!r} sets no `holdout`: the study chooses on a held-out validation "
                        f"split of the training images and scores the test set once; add e.g. `holdout: 2000`")
    out = os.path.abspath(opts.out or values.get("output") or "output/study")
    checkpoint = opts.teacher_checkpoint or values.get("teacher_pretrained", "")
    checkpoint = checkpoint if os.path.isabs(checkpoint) else os.path.join(REPO, checkpoint)
    return config, parser, values, out, teacher, checkpoint


def stop_on_sigterm(signum, frame):
    """A SIGTERM (a scheduler's, `kill`) stops the study as Ctrl-C does: its jobs are stopped, each resumes at the
    next start."""
    raise KeyboardInterrupt


def main(argv=None):
    """The study; stopped by Ctrl-C or SIGTERM, it stops its jobs and exits 75 (the same command resumes)."""
    try:
        return run_study(argv)
    except KeyboardInterrupt:
        print("stopped: so were its runs in progress (each resumes from its last checkpoint); run the same command "
              "again to go on", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)


@exit_cleanly_on_error
def run_study(argv):
    opts = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # the study's own work (test scoring, CKA) runs beside its jobs, one thread each
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    config, parser, values, out, teacher, teacher_checkpoint = study_settings(opts)
    plan = TINY_PLAN if opts.tiny else FULL_PLAN
    if opts.tiny:
        values = dict(values, batch_size=TINY_BATCH, holdout=TINY_HOLDOUT)
    unknown = [s for s in plan.students if not timm.is_model(s)]
    if unknown:
        raise UserError(f"students {' '.join(unknown)}: not a timm or custom_model name")
    if not opts.aggregate_only and not os.path.isfile(teacher_checkpoint):
        raise UserError(f"teacher checkpoint {teacher_checkpoint!r} not found; pass --teacher-checkpoint PATH "
                        f"(the config's teacher_pretrained is the default)")
    if opts.jobs < 1:
        raise UserError(f"--jobs {opts.jobs}: run at least one job at a time")
    os.makedirs(out, exist_ok=True)
    data_args = TINY_DATA_ARGS if opts.tiny else ["--dataset", values["dataset"]] + (
        [values["data_dir"]] if values.get("data_dir") else [])
    study = Study(config, out, teacher_checkpoint, cache_student=plan.students[0], data_args=data_args,
                  extra=TINY_TRAIN_ARGS if opts.tiny else [], ledger=read_ledger(os.path.join(out, "results.csv")))
    progress = Progress(study, plan, teacher, values, parser, opts.jobs, train=not opts.aggregate_only)
    start = time.time()
    schedule = pilot_phase(progress)
    print(f"pilot: {schedule}", flush=True)
    chosen = tuning_phase(progress, schedule) if schedule and opts.until != "pilot" else None
    if chosen is not None:
        print(f"tuning: {' '.join(f'{m} {setting_text(s)}' for m, s in chosen.items())}", flush=True)
    grid = grid_phase(progress, schedule, chosen) if chosen is not None and opts.until == "grid" else None
    progress.write()
    cka_images = min(opts.cka_images, TINY_CKA_IMAGES) if opts.tiny else opts.cka_images
    if grid and cka_images:
        cka_maps(progress, grid, teacher_checkpoint, cka_images)
    rows = progress.rows()
    print(f"{len(rows)} finished run(s) in {os.path.join(out, 'results.csv')}; table.md, top1.png; this invocation "
          f"{format_seconds(time.time() - start)}", flush=True)
    return rows


if __name__ == "__main__":
    main()
