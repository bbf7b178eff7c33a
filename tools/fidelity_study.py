#!/usr/bin/env python3
"""The fidelity study: distillation methods x cross-architecture pairs x seeds, under a protocol that holds.

    python tools/fidelity_study.py                       # every phase; again to resume (finished runs skip)
    python tools/fidelity_study.py --until grid          # stop after the grid (and its CKA maps)
    python tools/fidelity_study.py --aggregate-only      # rebuild the records, table and plot from the runs
    python tools/fidelity_study.py --tiny --out /tmp/s   # every phase in a few steps on synthetic data (tests)

Part 1's two pairs start from the config's teacher (the shipped ConvNeXt-style convnext_demo_32): one to the
DeiT-style deit_demo_32, one to the MLP-Mixer-style mixer_demo_32. Part 2's pair runs the other way: the token
teacher swin_demo_32 (pretrained/swin_demo_32_fmnist.pth) to the BatchNorm CNN resnet_demo_32. The recipe lives in
configs/study/fidelity.yaml, with its `holdout`: a fixed class-balanced validation split of Fashion-MNIST training
images, disjoint from the training subset and the same for every run, on which every choice is made. The test
set scores each final model once: its last epoch, and the checkpoint its validation top-1 selected.

1. Pilot: scratch on every part-1 student with the plan's pilot seeds, at E and 2E epochs for E = base, 2 base,
   4 base (4 base: the most epochs within the step cap). Scratch has plateaued at E when its 2E run gains less
   than the plan's plateau gain (0.3 points of validation top-1, the mean over seeds) on every student. The first
   E that plateaus, on the first training-subset size where one does, sets every later run's subset and epochs;
   when none does, the size whose largest E came closest (the smallest gain of its worst student), recorded as
   not plateaued.
2. Tuning: each method at its default and one alternative value, on the tuning student's pair and seeds; the
   higher validation top-1 wins (a tie keeps the default), then is fixed for every pair and seed.
3. Grid: every method at its chosen value on every pair (part 2's too), for the grid seeds (initialisation and
   augmentation). Then the CKA maps of every pair whose runs are here (tools/study_cka.py: the CKA seeds' maps,
   their std as the noise floor, scratch against scratch, the AAD's output).
4. Controls, on ConvNeXt -> DeiT for the control seeds: RSD and KD from the teacher's architecture at a seeded
   random initialisation (out/teachers/), and RSD with kappa 0.
5. RichKD isolated, on the same pair and seeds: the test top-1 of the teacher's, the second source's (the token
   teacher: another family, trained here, as CLIP cannot be fetched offline) and the fused logits (fusion.json);
   KD at RichKD's temperature and weight against RichKD (L), (F) and (LF), the source read from its cache of clean
   images.
6. PAT at its defaults on every pair for the PAT seeds (a live teacher: no cache; the costliest method).
KD, DKD, OFA, RSD and RichKD read their teacher from a cache per teacher and seed (tools/build_cache.py), built
before their runs. `--jobs` runs share the machine, one thread each. Under --out, rewritten as runs finish:
results.csv (a row per run), pilot.json, tuning.json, table.md (cells, paired differences with Holm-corrected p,
the arms' tables, the CKA summary), top1.png (our gains beside the paper's) and wall.json (the tool's wall time per
invocation, per part; `--record-teacher-run` adds the token teacher's training to part 2).
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
from engine.models import create_model
from engine.train_args import build_train_parser
from engine.weights import classifier_weight_names, extract_state_dict, read_checkpoint
from kdcore.errors import EXIT_PREEMPTED, UserError, exit_cleanly_on_error
from kdcore.io import atomic_write, atomic_write_csv, atomic_write_json
from kdcore.machine import cpu_model_name
from tools.study_cka import seed_cka
from tools.study_fusion import main as fusion_main
from tools.study_report import FUSION, write_report
from tools.study_runs import (
    METHODS,
    RANDOM,
    TEST_SCORES,
    RunSpec,
    Study,
    epoch_rows,
    has_run_folder,
    is_done,
    read_marker,
    row_key,
    run_jobs,
    run_logged,
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
    other_pairs: tuple = ()  # (teacher label, student): the grid's pairs beyond the config teacher's students
    control_student: str = ""  # the config teacher -> this student: the controls and RichKD isolated
    control_seeds: tuple = ()
    controls: tuple = ()  # (teacher label suffix, method, setting added to the method's chosen one)
    richkd_modes: tuple = ()  # RichKD's modes run, beside KD at RichKD's temperature and weight
    pat_seeds: tuple = ()
    pat_students: tuple = ()  # PAT on the grid pairs of these students
    cka_seeds: tuple = ()  # CKA maps of the grid's CKA_METHODS on every pair whose runs are here


RANDOM_TEACHER_SEED = 0
TOKEN_TEACHER = "swin_demo_32"  # the other direction's teacher, and RichKD's second source
TOKEN_TEACHER_CHECKPOINT = os.path.join("pretrained", "swin_demo_32_fmnist.pth")
CONTROLS = ((RANDOM, "rsd", ()), (RANDOM, "kd", ()), ("", "rsd", (("rsd_kappa", 0.0),)))
TUNING = {"scratch": ("lr", 2e-3), "kd": ("kd_temperature", 4.0), "dkd": ("dkd_beta", 8.0),
          "ofa": ("ofa_eps", 1.5), "rsd": ("rsd_loss_weight", 0.4)}
FULL_PLAN = Plan(students=("deit_demo_32", "mixer_demo_32"), methods=("scratch", "kd", "dkd", "ofa", "rsd"),
                 pilot_subsets=(2000, 1000), pilot_seeds=(0, 1), pilot_levels=3, plateau_gain=0.3, step_cap=750,
                 tuning=TUNING, tuning_student="mixer_demo_32", tuning_seeds=(0,), grid_seeds=(0, 1, 2, 3, 4),
                 other_pairs=((TOKEN_TEACHER, "resnet_demo_32"),), control_student="deit_demo_32",
                 control_seeds=(0, 1, 2), controls=CONTROLS, richkd_modes=("L", "F", "LF"), pat_seeds=(0, 1, 2),
                 pat_students=("deit_demo_32", "mixer_demo_32", "resnet_demo_32"), cka_seeds=(0, 1, 2))
# --tiny: two methods, one seed, 64 generated images at batch 16 (4 steps an epoch), 2 and 4 epochs;
# every part-2 phase, each in its fewest runs (one control arm, the random-weight teacher's; PAT on one pair)
TINY_PLAN = Plan(students=("deit_demo_32", "mixer_demo_32"), methods=("scratch", "rsd"), pilot_subsets=(64,),
                 pilot_seeds=(0,), pilot_levels=1, plateau_gain=math.inf, step_cap=8, tuning=TUNING,
                 tuning_student="mixer_demo_32", tuning_seeds=(0,), grid_seeds=(0,),
                 other_pairs=((TOKEN_TEACHER, "resnet_demo_32"),), control_student="deit_demo_32",
                 control_seeds=(0,), controls=CONTROLS[1:2], richkd_modes=("L",), pat_seeds=(0,),
                 pat_students=("deit_demo_32",), cka_seeds=(0,))
TINY_BATCH, TINY_HOLDOUT = 16, 32
TINY_TRAIN_ARGS = ["--dataset", "synthetic", "--synthetic-train-size", "128", "--synthetic-val-size", "32",
                   "--holdout", str(TINY_HOLDOUT), "-b", str(TINY_BATCH), "--workers", "0", "--log-interval", "1",
                   "--warmup-epochs", "0"]
TINY_DATA_ARGS = ["--dataset", "synthetic"]
TINY_CKA_IMAGES = 16
TINY_SOURCE_ARGS = [*TINY_DATA_ARGS, *TINY_TRAIN_ARGS[2:6], "-b", str(TINY_BATCH), "--workers", "0"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG, help="train.py YAML config holding the recipe and the teacher")
    p.add_argument("--out", default="", help="study folder (default: the config's `output`)")
    p.add_argument("--teacher-checkpoint", default="", help="default: the config's teacher_pretrained")
    p.add_argument("--token-teacher-checkpoint", default="",
                   help=f"the other direction's teacher (default {TOKEN_TEACHER_CHECKPOINT}; --tiny: random)")
    p.add_argument("--until", default=PHASES[-1], choices=PHASES, help="the last phase to run")
    p.add_argument("--record-teacher-run", default="", metavar="RUN",
                   help="add the token teacher's train.py run (its folder) to wall.json's part 2, then exit")
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
        self.parser = parser
        self.batch, self.holdout = values["batch_size"], values.get("holdout")
        self.defaults = {m: (dest, default_value(values, parser, dest)) for m, (dest, _) in plan.tuning.items()}
        self.roles, self.pilot, self.tuning = {}, None, None
        self.finished = {}  # run key -> its row without roles: a finished run's figures never change
        self.started = time.time()
        self.invocation = {"start": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model_name()}

    def pair(self, student, teacher=None):
        return pair_name(teacher or self.teacher, student)

    def spec(self, student, method, setting, size, epochs, seed, teacher=None):
        return RunSpec(self.pair(student, teacher), student, method, setting, size, epochs, seed)

    def grid_pairs(self):
        """(teacher label, student) of every grid pair: the config teacher's students, then the plan's others."""
        return [(self.teacher, s) for s in self.plan.students] + list(self.plan.other_pairs)

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
        atomic_write_json(wall_record(entries), path)

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


PHASES = ("pilot", "tuning", "grid", "controls", "richkd", "pat")
WALL_LOG = "wall.json"  # the study tool's own wall-clock time, per invocation that trained


def wall_record(entries):
    """wall.json's content: the invocations, their total and the total of each part of the study (an entry
    without a `part` belongs to part 1: the pilot, the tuning and the first two pairs' grid)."""
    parts = {}
    for e in entries:
        parts[str(e.get("part", 1))] = parts.get(str(e.get("part", 1)), 0.0) + e["wall_s"]
    return {"invocations": entries, "total_s": round(sum(e["wall_s"] for e in entries), 1),
            "part_s": {part: round(total, 1) for part, total in sorted(parts.items())}}


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


def chosen_setting(progress, chosen, method):
    return chosen.get(method, progress.default_setting(method))


def grid_runs(progress, schedule, chosen, pairs):
    """Every method at its chosen value on `pairs` ((teacher label, student)), for the grid seeds."""
    return [progress.spec(s, m, chosen_setting(progress, chosen, m), schedule["train_subset"], schedule["epochs"],
                          seed, teacher)
            for seed in progress.plan.grid_seeds for teacher, s in pairs for m in progress.plan.methods]


def grid_phase(progress, schedule, chosen, pairs):
    runs = grid_runs(progress, schedule, chosen, pairs)
    return runs if progress.run(runs, "grid") else None


def controls_phase(progress, schedule, chosen):
    """On the config teacher -> the control student: each plan.controls arm (a random-weight teacher, an
    ablated loss) at the method's chosen value, for the control seeds; the grid's runs of these seeds are the
    arms' references."""
    plan = progress.plan
    runs = [progress.spec(plan.control_student, m, chosen_setting(progress, chosen, m) + extra,
                          schedule["train_subset"], schedule["epochs"], seed, progress.teacher + suffix)
            for seed in plan.control_seeds for suffix, m, extra in plan.controls]
    return runs if progress.run(runs, "controls") else None


def richkd_arms(progress):
    """(method, setting) of RichKD isolated: KD at RichKD's (L) temperature and weight (alpha 1: the task teacher
    alone), then each of the plan's RichKD modes at RichKD's defaults (alpha 0.7)."""
    get = progress.parser.get_default
    kd = (("kd_temperature", get("richkd_temperature")), ("kd_loss_weight", get("richkd_logit_weight")))
    return [("kd", kd)] + [("richkd", (("richkd_mode", mode),)) for mode in progress.plan.richkd_modes]


def richkd_phase(progress, schedule, source_args, training_set_args):
    """RichKD isolated, on the config teacher -> the control student: the test top-1 of the teacher, the second
    source and their fusion (fusion.json), the second source's cache of the runs' clean training images (the
    same held-out split and subset: `training_set_args`), then the arms' runs."""
    plan, study = progress.plan, progress.study
    model, checkpoint = study.teachers[TOKEN_TEACHER]
    cache = os.path.join(study.out, "caches", f"{TOKEN_TEACHER}_clean", f"n{schedule['train_subset']}")
    if progress.train and not os.path.isfile(os.path.join(cache, "meta.json")):
        run_logged(study, [sys.executable, os.path.join(REPO, "tools", "build_cache.py"), *source_args,
                           *training_set_args, "--train-subset", str(schedule["train_subset"]),
                           "--source", model, "--weights", checkpoint, "--output", cache,
                           "--store", "logits", "embedding"], cache + ".build", "build_output.txt")
    fusion_path = os.path.join(study.out, FUSION)
    if progress.train and not os.path.isfile(fusion_path):
        teacher_model, teacher_checkpoint = study.teachers[progress.teacher]
        fusion_main([*source_args, "--teacher", teacher_model, "--teacher-checkpoint", teacher_checkpoint,
                     "--source", model, "--source-checkpoint", checkpoint,
                     "--alpha", str(progress.parser.get_default("richkd_alpha")), "--json", fusion_path])
    study.method_args["richkd"] = ["--richkd-cache", cache]
    runs = [progress.spec(plan.control_student, m, setting, schedule["train_subset"], schedule["epochs"], seed)
            for seed in plan.control_seeds for m, setting in richkd_arms(progress)]
    return runs if progress.run(runs, "richkd") else None


def pat_phase(progress, schedule, pairs):
    """PAT at its defaults on `pairs` (the PAT students' grid pairs), for the PAT seeds (it reads a live teacher:
    no cache)."""
    runs = [progress.spec(s, "pat", progress.default_setting("pat"), schedule["train_subset"], schedule["epochs"],
                          seed, teacher)
            for seed in progress.plan.pat_seeds for teacher, s in pairs]
    return runs if progress.run(runs, "pat") else None


def cka_maps(progress, grid_runs, images):
    """cka_<pair>.json/png of every grid pair whose runs of the CKA seeds are here: the teacher against the
    CKA_METHODS students of each seed, their std over seeds as the noise floor, scratch against scratch
    (tools/study_cka.py). Computed once, right after the runs: the runs' checkpoints stay out of git."""
    out = progress.study.out
    for teacher, student in progress.grid_pairs():
        pair = progress.pair(student, teacher)
        path = os.path.join(out, f"cka_{pair}.json")
        found = [r for r in grid_runs if r.pair == pair and r.seed in progress.plan.cka_seeds
                 and r.method in CKA_METHODS]
        missing = [r.label() for r in found if not has_run_folder(progress.study, r)]
        if os.path.isfile(path) or not found:
            continue
        if missing:  # finished in another sitting, elsewhere: its checkpoint is not here
            print(f"CKA maps of {pair} skipped: no checkpoint here of {'; '.join(missing)}", flush=True)
            continue
        model, checkpoint = progress.study.teachers[teacher]
        students = {m: [os.path.join(r.folder(out), "last.pth.tar") for r in sorted(found, key=lambda r: r.seed)
                        if r.method == m] for m in CKA_METHODS if any(r.method == m for r in found)}
        seed_cka(model, checkpoint, students, sorted(progress.plan.cka_seeds), images, path,
                 os.path.join(out, f"cka_{pair}.png"))


def random_weights(path, model_name, like, seed=RANDOM_TEACHER_SEED):
    """`model_name` at timm's initialisation after torch.manual_seed(seed), with as many classes as the checkpoint
    `like`, saved once to `path` (a plain state dict): the random-weight control's teacher, or --tiny's token
    teacher."""
    if not os.path.isfile(path):
        state = extract_state_dict(read_checkpoint(like, label="teacher checkpoint"), like)
        probe = create_model(model_name, num_classes=None)
        num_classes = state[classifier_weight_names(probe)[0]].shape[0]
        torch.manual_seed(seed)
        model = create_model(model_name, num_classes=num_classes)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return path


def study_teachers(opts, out, teacher, checkpoint):
    """Study.teachers: the config's teacher, its random-weight control and the token teacher (label -> (timm
    model, checkpoint)); the generated ones are made here under out/teachers/."""
    random_path = os.path.join(out, "teachers", f"{teacher}{RANDOM}_seed{RANDOM_TEACHER_SEED}.pth")
    token = opts.token_teacher_checkpoint or os.path.join(REPO, TOKEN_TEACHER_CHECKPOINT)
    if opts.tiny and not opts.token_teacher_checkpoint:
        token = random_weights(os.path.join(out, "teachers", f"{TOKEN_TEACHER}{RANDOM}_tiny.pth"), TOKEN_TEACHER,
                               checkpoint)
    if not opts.aggregate_only:
        random_weights(random_path, teacher, checkpoint)
        if not os.path.isfile(token):
            raise UserError(f"token teacher checkpoint {token!r} not found: train it (pretrained/README.md, "
                            f"configs/demo/token_teacher.yaml) or pass --token-teacher-checkpoint PATH")
    return {teacher: (teacher, checkpoint), teacher + RANDOM: (teacher, random_path),
            TOKEN_TEACHER: (TOKEN_TEACHER, token)}


def teacher_training_entry(folder):
    """A wall.json entry (part 2) for the token teacher's train.py run in `folder`, from its log.txt: the time
    from its first to its last line (train.py's imports before the first are not in it)."""
    path = os.path.join(folder, "log.txt")
    if not os.path.isfile(path):
        raise UserError(f"--record-teacher-run {folder!r}: no log.txt there; pass a train.py run folder")
    with open(path) as f:
        stamps = [line.split(" ", 1)[0] for line in f if line[:2].isdigit() and line[2:3] == ":"]
    seconds = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in (t.split(":") for t in stamps)]
    wall = sum((b - a) % 86400 for a, b in zip(seconds, seconds[1:]))  # a run may cross midnight
    day = datetime.date.fromtimestamp(os.path.getmtime(path))
    return {"start": f"{day.isoformat()}T{stamps[0]}", "cpu": cpu_model_name(), "wall_s": float(wall), "part": 2,
            "what": f"train.py run {os.path.basename(os.path.normpath(folder))}: the token teacher"}


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
    if opts.record_teacher_run:
        return record_teacher_run(out, opts.record_teacher_run)
    plan = TINY_PLAN if opts.tiny else FULL_PLAN
    if opts.tiny:
        values = dict(values, batch_size=TINY_BATCH, holdout=TINY_HOLDOUT)
    unknown = [s for s in plan.students + tuple(s for _, s in plan.other_pairs) if not timm.is_model(s)]
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
    study = Study(config, out, study_teachers(opts, out, teacher, teacher_checkpoint), cache_student=plan.students[0],
                  data_args=data_args, extra=TINY_TRAIN_ARGS if opts.tiny else [],
                  ledger=read_ledger(os.path.join(out, "results.csv")))
    progress = Progress(study, plan, teacher, values, parser, opts.jobs, train=not opts.aggregate_only)
    start = time.time()
    until = PHASES.index(opts.until)
    schedule = pilot_phase(progress)
    print(f"pilot: {schedule}", flush=True)
    chosen = tuning_phase(progress, schedule) if schedule and until >= PHASES.index("tuning") else None
    if chosen is not None:
        print(f"tuning: {' '.join(f'{m} {setting_text(s)}' for m, s in chosen.items())}", flush=True)
    done = chosen is not None and until >= PHASES.index("grid")
    first_pairs = progress.grid_pairs()[:len(plan.students)]
    if done and all(is_done(study, r) for r in grid_runs(progress, schedule, chosen, first_pairs)):
        progress.invocation["part"] = 2  # part 1 was complete when this invocation began: its time is part 2's
    grid = done and grid_phase(progress, schedule, chosen, progress.grid_pairs())
    cka_images = min(opts.cka_images, TINY_CKA_IMAGES) if opts.tiny else opts.cka_images
    if grid and cka_images:
        cka_maps(progress, grid, cka_images)
    training_set_args = ["--holdout", str(TINY_HOLDOUT if opts.tiny else values["holdout"]),
                         "--train-subset-seed", str(values.get("train_subset_seed", 0))]
    source_args = TINY_SOURCE_ARGS if opts.tiny else data_args + ["-b", "250", "--workers", "0"]
    for phase, run_phase in (("controls", lambda: controls_phase(progress, schedule, chosen)),
                             ("richkd", lambda: richkd_phase(progress, schedule, source_args, training_set_args)),
                             ("pat", lambda: pat_phase(progress, schedule, [
                                 p for p in progress.grid_pairs() if p[1] in plan.pat_students]))):
        if not grid or until < PHASES.index(phase):
            break
        grid = run_phase()
    progress.write()
    rows = progress.rows()
    print(f"{len(rows)} finished run(s) in {os.path.join(out, 'results.csv')}; table.md, top1.png; this invocation "
          f"{format_seconds(time.time() - start)}", flush=True)
    return rows


def record_teacher_run(out, folder):
    """--record-teacher-run: the token teacher's training joins wall.json's part 2 (once: its start names it)."""
    path = os.path.join(out, WALL_LOG)
    with open(path) as f:
        entries = json.load(f)["invocations"]
    entry = teacher_training_entry(folder)
    entries = [e for e in entries if e["start"] != entry["start"]] + [entry]
    atomic_write_json(wall_record(entries), path)
    print(f"{path}: the token teacher's {format_seconds(entry['wall_s'])} added to part 2", flush=True)
    return entry


if __name__ == "__main__":
    main()
