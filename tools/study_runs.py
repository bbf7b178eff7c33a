"""The fidelity study's runs: what one run is, where it lives, the commands that train, score and cache it, and a
scheduler that keeps a few of them running side by side (one thread each) until all are done.

A run trains with train.py on the training subset, evaluating every epoch on the held-out validation split
(`--holdout`); when it has finished, validate.py scores its last and its validation-selected checkpoints on the
test set, once each. Every command is the same at a first start and at every later one: train.py's `--resume
auto` continues a run that a kill or a Ctrl-C stopped, so a study spans as many sittings as it needs.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import yaml

from engine.loop import format_seconds
from kdcore.errors import UserError
from kdcore.io import atomic_write_text
from kdcore.machine import cpu_model_name
from tools.study_job import job_context, run_script
from validate import main as validate_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "study.json"  # per run: wall seconds over all its attempts, their CPU(s), the date it finished
MARKER_TEMPORARY_SUFFIX = ".writing"
TEST_SCORES = "test.json"  # per run: the test top-1 of its last and its validation-selected checkpoints
HEARTBEAT_S = 10  # how often a running job's wall time is written to its marker
TICK_S = 60  # how often the scheduler reports to its caller while jobs run
METHODS = {"scratch": "vanilla", "kd": "kd", "dkd": "dkd", "ofa": "ofa", "rsd": "rsd", "pat": "pat",
           "richkd": "richkd", "dist": "dist", "fitnet": "fitnet", "crd": "crd"}  # study name -> --distiller, in
# the tables' order
RANDOM = "_random"  # a teacher label's suffix: its architecture at a seeded random initialisation (the control)
CACHED_METHODS = ("kd", "dkd", "ofa", "rsd", "richkd", "dist")  # read the teacher from the per-seed cache


def setting_text(setting):
    """'kd_temperature=4.0' for (('kd_temperature', 4.0),); 'default' for ()."""
    return ",".join(f"{flag}={value}" for flag, value in setting) or "default"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: a pair, a method at a setting of its hyperparameters, a schedule, a seed."""

    pair: str
    student: str
    method: str
    setting: tuple  # ((train.py dest, value), ...) on top of the config and the method's defaults
    train_subset: int
    epochs: int
    seed: int

    def folder(self, out):
        schedule = f"n{self.train_subset}_e{self.epochs}"
        return os.path.join(out, "runs", self.pair, self.method, setting_text(self.setting), schedule,
                            f"seed{self.seed}")

    def label(self):
        return (f"{self.pair} {self.method} {setting_text(self.setting)} n={self.train_subset} e={self.epochs} "
                f"seed {self.seed}")

    @property
    def teacher(self):
        """The teacher's label in the study (Study.teachers): the pair's first part."""
        return self.pair.split("-", 1)[0]

    def key(self):
        """What names the run in a results row (results.csv's columns of the same names, as text)."""
        return (self.pair, self.method, setting_text(self.setting), str(self.train_subset), str(self.epochs),
                str(self.seed))


def row_key(row):
    return tuple(str(row[c]) for c in ("pair", "method", "hyperparameters", "train_subset", "epochs", "seed"))


@dataclass(frozen=True)
class CacheSpec:
    """A teacher's outputs on every epoch's training views of one seed (tools/build_cache.py), for the runs of
    every pair it teaches: the students share one input spec (a run whose student did not would refuse the
    cache)."""

    teacher: str  # its label in Study.teachers
    train_subset: int
    epochs: int
    seed: int

    def folder(self, out):
        return os.path.join(out, "caches", self.teacher, f"n{self.train_subset}_e{self.epochs}_seed{self.seed}")

    def label(self):
        return f"{self.teacher} cache n={self.train_subset} e={self.epochs} seed {self.seed}"


def flag_args(setting):
    """train.py flags for a setting: (('kd_temperature', 4.0),) -> ['--kd-temperature', '4.0']."""
    return [arg for dest, value in setting for arg in (f"--{dest.replace('_', '-')}", str(value))]


@dataclass
class Study:
    """What every command of a study shares."""

    config: str  # train.py YAML config: the recipe, --holdout
    out: str
    teachers: dict  # label (a pair's first part) -> (timm model name, checkpoint path)
    cache_student: str  # the student whose input spec the caches' views are made for
    data_args: list  # validate.py's dataset flags for the test set
    extra: list = field(default_factory=list)  # appended to every train.py / build_cache.py command (--tiny)
    method_args: dict = field(default_factory=dict)  # method -> train.py flags its runs add (RichKD's source)
    cached_methods: tuple = CACHED_METHODS  # () for runs a cache cannot serve (batch-paired mixup)
    ledger: dict = field(default_factory=dict)  # run key -> results row of runs finished in an earlier sitting
    stop: threading.Event = field(default_factory=threading.Event)

    def cache_for(self, run):
        if run.method not in self.cached_methods:
            return None
        return CacheSpec(run.teacher, run.train_subset, run.epochs, run.seed)

    def teacher_args(self, teacher):
        model, checkpoint = self.teachers[teacher]
        return ["--teacher", model, "--teacher-pretrained", checkpoint]

    def schedule_args(self, spec):
        return ["--train-subset", str(spec.train_subset), "--epochs", str(spec.epochs), "--seed", str(spec.seed)]

    def train_command(self, run):
        folder = run.folder(self.out)
        command = [sys.executable, os.path.join(REPO, "train.py"), "-c", self.config, "--model", run.student,
                   "--distiller", METHODS[run.method], *self.schedule_args(run), *self.teacher_args(run.teacher),
                   "--output", os.path.dirname(folder), "--experiment", os.path.basename(folder), "--resume", "auto",
                   *flag_args(run.setting), *self.method_args.get(run.method, []), *self.extra]
        cache = self.cache_for(run)
        return command + (["--teacher-cache", cache.folder(self.out)] if cache else [])

    def test_commands(self, run):
        """validate.py's arguments on the test set (no --holdout) for the last and the validation-selected weights
        (run in the study's process, on one thread: its imports are paid once)."""
        folder = run.folder(self.out)
        return {which: [*self.data_args, "--checkpoint", os.path.join(folder, f"{which}.pth.tar"), "--workers", "0",
                        "-b", "250", "--results-file", os.path.join(folder, f"test_{which}.json")]
                for which in ("last", "best")}

    def cache_command(self, cache):
        return [sys.executable, os.path.join(REPO, "tools", "build_cache.py"), "--views", "augmented",
                "-c", self.config, "--model", self.cache_student, *self.schedule_args(cache),
                *self.teacher_args(cache.teacher), "--teacher-cache", cache.folder(self.out),
                "--cache-dtype", "fp32", "--store", "logits", "embedding", *self.extra]


def read_marker(folder):
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_marker(folder, marker):
    """Atomically, so a killed study never leaves a half-written marker. Its temporary file is not a '*.tmp':
    a run starting in this folder removes those (its own, left by a kill) and would take this one mid-write."""
    atomic_write_text(json.dumps(marker), os.path.join(folder, MARKER), suffix=MARKER_TEMPORARY_SUFFIX)


def epoch_rows(folder):
    path = os.path.join(folder, "summary.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_trained(folder):
    """Whether the run trained all the epochs its own args.yaml asks for."""
    args_path = os.path.join(folder, "args.yaml")
    if not os.path.isfile(args_path):
        return False
    with open(args_path) as f:
        epochs = yaml.safe_load(f)["epochs"]
    return len(epoch_rows(folder)) >= epochs


def is_done(study, job):
    """A cache that is built; a run trained and scored here, or recorded in the ledger (results.csv of an earlier
    sitting, whose run folders may live on another machine)."""
    if isinstance(job, CacheSpec):
        return os.path.isfile(os.path.join(job.folder(study.out), "meta.json"))
    return has_run_folder(study, job) or job.key() in study.ledger


def has_run_folder(study, run):
    folder = run.folder(study.out)
    return is_trained(folder) and os.path.isfile(os.path.join(folder, TEST_SCORES))


def run_logged(study, command, folder, log_name):
    """Run `command` (`python <script> args`: train.py or tools/build_cache.py) as a process forked from the
    study's pre-imported server (tools/study_job.py), its output appended to <folder>/<log_name>, keeping the
    folder's marker's wall time current (a resumed job adds to the time of its earlier attempts); stops it when
    the study stops."""
    earlier = read_marker(folder)
    before = earlier.get("wall_s", 0.0)
    cpus = set(earlier.get("cpu", "").split(" + ")) - {""}
    marker = {"cpu": " + ".join(sorted(cpus | {cpu_model_name()}))}
    os.makedirs(folder, exist_ok=True)
    start = time.time()
    log_path = os.path.join(folder, log_name)
    process = job_context().Process(target=run_script, args=(command[1], command[2:], log_path, REPO))
    process.start()
    try:
        beat = time.time()
        while process.exitcode is None:
            process.join(timeout=1)
            if process.exitcode is None and study.stop.is_set():
                raise KeyboardInterrupt
            if time.time() - beat >= HEARTBEAT_S:
                write_marker(folder, dict(marker, wall_s=before + time.time() - start))
                beat = time.time()
    except BaseException:  # Ctrl-C, a kill of the study or another job's failure: the next start resumes
        process.terminate()
        process.join()
        write_marker(folder, dict(marker, wall_s=before + time.time() - start))
        raise
    code = process.exitcode
    wall = before + time.time() - start
    if code != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise UserError(f"{os.path.basename(command[1])} failed (exit code {code}) in {folder}; its output ends:\n"
                        f"{tail}\nfix the cause and run the study again: finished runs are kept")
    write_marker(folder, dict(marker, wall_s=wall, date=datetime.date.today().isoformat()))
    return wall


def execute_job(study, job):
    """Train (or resume) a run and score it on the test set, or build a cache. Returns the job's wall seconds."""
    folder = job.folder(study.out)
    if isinstance(job, CacheSpec):
        return run_logged(study, study.cache_command(job), folder + ".build", "build_output.txt")
    wall = read_marker(folder).get("wall_s", 0.0)
    if not is_trained(folder):
        wall = run_logged(study, study.train_command(job), folder, "train_output.txt")
    scores = {}
    val = [float(row["eval_top1"]) for row in epoch_rows(folder)]
    for which, argv in study.test_commands(job).items():
        if which == "best" and val.index(max(val)) == len(val) - 1:  # best.pth.tar is the last epoch's
            scores[which] = scores["last"]
            continue
        validate_main(argv)  # prints its one JSON line
        with open(os.path.join(folder, f"test_{which}.json")) as f:
            scores[which] = json.load(f)
    atomic_write_text(json.dumps({"last": scores["last"], "best": scores["best"]}), os.path.join(folder, TEST_SCORES))
    return wall


def run_jobs(study, jobs, workers, on_done=None, on_tick=None):
    """Run every job not done yet, `workers` at a time, a run only once its cache exists, in the order given
    (so an early stop leaves whole seeds). `on_done(job, wall)` follows each, `on_tick()` every minute, both in
    the main thread. A failure or Ctrl-C stops the others (each resumes at the next start)."""
    pending = [job for job in dict.fromkeys(jobs) if not is_done(study, job)]
    for job in list(pending):  # a run's cache comes before it
        cache = study.cache_for(job) if isinstance(job, RunSpec) else None
        if cache and cache not in pending and not is_done(study, cache):
            pending.insert(pending.index(job), cache)
    total, finished = len(pending), 0
    running = {}
    started = time.time()

    def ready(job):
        cache = study.cache_for(job) if isinstance(job, RunSpec) else None
        return cache is None or is_done(study, cache)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            while pending or running:
                while len(running) < workers:
                    job = next((j for j in pending if ready(j)), None)
                    if job is None:
                        break
                    pending.remove(job)
                    print(f"[{finished + len(running) + 1}/{total}] {job.label()}: starting", flush=True)
                    running[pool.submit(execute_job, study, job)] = job
                done, _ = wait(running, timeout=TICK_S, return_when=FIRST_COMPLETED)
                if on_tick:
                    on_tick()
                for future in done:
                    job = running.pop(future)
                    wall = future.result()
                    finished += 1
                    left = total - finished
                    eta = (time.time() - started) / finished * left
                    print(f"  done: {job.label()} in {format_seconds(wall)}; {left} job(s) left, ETA "
                          f"{format_seconds(eta)}", flush=True)
                    if on_done:
                        on_done(job, wall)
        except BaseException:
            study.stop.set()
            raise
        finally:
            if study.stop.is_set():
                wait(running)
    return total
