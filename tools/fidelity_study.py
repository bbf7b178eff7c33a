#!/usr/bin/env python3
"""The fidelity study: distillation methods x cross-architecture pairs x seeds, each a plain train.py run.

    python tools/fidelity_study.py                      # the full grid of configs/study/fidelity.yaml
    python tools/fidelity_study.py --methods scratch kd dkd ofa rsd dist fitnet crd --seeds 0 1 2
    python tools/fidelity_study.py --aggregate-only     # rebuild the table, plot and CKA maps from the runs
    python tools/fidelity_study.py --tiny --out /tmp/s  # a few steps on synthetic data (the test suite's)

Both pairs start from the config's teacher (the shipped ConvNeXt-style convnext_demo_32): one to the DeiT-style
deit_demo_32, one to the MLP-Mixer-style mixer_demo_32. The recipe (low-data subset, epochs, optimiser, the
teacher pinned to fp32) lives in the YAML config; per-method settings are the distillers' own defaults.

Run `k` of method `m` on pair `p` lives in `<out>/<p>/<m>/seed<k>`. Run again, the study skips finished runs
(summary.csv holds every epoch), resumes half-finished ones (`train.py --resume`, so the weights equal an
uninterrupted run's) and starts the rest. After each run it rewrites:
- `results.csv`: method, pair, seed, best and last top-1, wall seconds, CPU, date of every finished run;
- `table.md`: mean +- sample std of the last-epoch top-1 over seeds (and of the best epoch's) per method and pair;
- `top1.png`: one panel per pair, last-epoch top-1 per method, mean with std error bars and each seed's point;
and at the end `cka_<pair>.png`: the teacher's and the scratch, KD, OFA and RSD students' (first seed) linear
CKA maps side by side (tools/cka.py).
"""
import argparse
import csv
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import timm
import yaml
from matplotlib.figure import Figure

import custom_model  # noqa: F401  (registers the demo students with timm before --students is checked)
from distillers import DISTILLERS
from engine.config import load_config
from engine.loop import format_seconds
from engine.train_args import build_train_parser
from kdcore.errors import UserError, exit_cleanly_on_error
from kdcore.io import atomic_write, atomic_write_csv, atomic_write_text
from kdcore.machine import cpu_model_name
from tools.cka import main as cka_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {"scratch": "vanilla", "kd": "kd", "dkd": "dkd", "dist": "dist", "fitnet": "fitnet", "crd": "crd",
           "ofa": "ofa", "rsd": "rsd"}  # study name -> --distiller, in the table's order
REQUIRED_METHODS = ("scratch", "kd", "dkd", "ofa", "rsd")
CKA_METHODS = ("scratch", "kd", "ofa", "rsd")
STUDENTS = ("deit_demo_32", "mixer_demo_32")
SEEDS = (0, 1, 2)
CONFIG = os.path.join(REPO, "configs", "study", "fidelity.yaml")
RESULT_COLUMNS = ("method", "pair", "seed", "best_top1", "last_top1", "wall_s", "cpu", "date")
MARKER = "study.json"  # per run: wall seconds over all its attempts, their CPU(s), the date it finished
HEARTBEAT_S = 10  # how often a running run's wall time is written to its marker

# --tiny: two methods, one seed, 4 steps of 16 images on generated data, scored on 32 images
TINY_METHODS, TINY_SEEDS, TINY_CKA_IMAGES = ("scratch", "rsd"), (0,), 16
TINY_TRAIN_ARGS = ["--dataset", "synthetic", "--synthetic-train-size", "128", "--synthetic-val-size", "32",
                   "--train-subset", "64", "--epochs", "1", "-b", "16", "--workers", "0", "--log-interval", "1",
                   "--warmup-epochs", "0"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG, help="train.py YAML config holding the recipe and the teacher")
    p.add_argument("--out", default="", help="study folder (default: the config's `output`)")
    p.add_argument("--methods", nargs="+", default=None, choices=tuple(METHODS),
                   help=f"default: {' '.join(REQUIRED_METHODS)}")
    p.add_argument("--students", nargs="+", default=list(STUDENTS), help="one pair per student, from the teacher")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help=f"default: {' '.join(map(str, SEEDS))}")
    p.add_argument("--teacher-checkpoint", default="", help="default: the config's teacher_pretrained")
    p.add_argument("--cka-images", type=int, default=500, help="validation images per CKA map (0: no maps)")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; rebuild the outputs")
    p.add_argument("--tiny", action="store_true", help="two methods, one seed, a few steps on synthetic data")
    return p


def pair_name(teacher, student):
    return f"{teacher}-{student}"


def run_folder(out, pair, method, seed):
    return os.path.join(out, pair, method, f"seed{seed}")


def read_marker(folder):
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_marker(folder, marker):
    """Atomically, so a killed study never leaves a half-written marker."""
    atomic_write_text(json.dumps(marker), os.path.join(folder, MARKER))


def epoch_rows(folder):
    path = os.path.join(folder, "summary.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_finished(folder):
    """Whether the run trained all the epochs its own args.yaml asks for."""
    args_path = os.path.join(folder, "args.yaml")
    if not os.path.isfile(args_path):
        return False
    with open(args_path) as f:
        epochs = yaml.safe_load(f)["epochs"]
    return len(epoch_rows(folder)) >= epochs


def train_command(config, folder, student, method, seed, teacher_checkpoint, extra):
    """The train.py command of a run in `folder`: the same for its first start and every later one, which
    `--resume auto` continues from the run's newest checkpoint (a recovery file after a kill or preemption)."""
    return [sys.executable, os.path.join(REPO, "train.py"), "-c", config, "--model", student,
            "--distiller", METHODS[method], "--seed", str(seed), "--teacher-pretrained", teacher_checkpoint,
            "--output", os.path.dirname(folder), "--experiment", os.path.basename(folder), "--resume", "auto",
            *extra]


def train_one(command, folder, cpu):
    """Run train.py, its output appended to <folder>/train_output.txt, keeping the marker's wall time current
    (a resumed run adds to the time of its earlier attempts). Returns the run's total wall seconds."""
    earlier = read_marker(folder)  # {} for a first start
    before = earlier.get("wall_s", 0.0)
    cpus = set(earlier.get("cpu", "").split(" + ")) - {""}
    marker = {"cpu": " + ".join(sorted(cpus | {cpu}))}
    os.makedirs(folder, exist_ok=True)
    start = time.time()
    with open(os.path.join(folder, "train_output.txt"), "a") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    code = process.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    write_marker(folder, dict(marker, wall_s=before + time.time() - start))
        except BaseException:  # Ctrl-C or a kill of the study: stop the run too, the next invocation resumes it
            process.terminate()
            process.wait()
            raise
    wall = before + time.time() - start
    if code != 0:
        with open(os.path.join(folder, "train_output.txt")) as f:
            tail = "".join(f.readlines()[-15:])
        raise UserError(f"train.py failed (exit code {code}) in {folder}; its output ends:\n{tail}\n"
                        f"fix the cause and run the study again: finished runs are kept")
    write_marker(folder, dict(marker, wall_s=wall, date=datetime.date.today().isoformat()))
    return wall


def collect_results(out):
    """One row per finished run under `out` (<pair>/<method>/seed<k>), whatever grid produced it."""
    rows = []
    if not os.path.isdir(out):
        return rows
    for pair in sorted(os.listdir(out)):
        for method in METHODS:
            method_dir = os.path.join(out, pair, method)
            if not os.path.isdir(method_dir):
                continue
            for name in os.listdir(method_dir):
                folder = os.path.join(method_dir, name)
                if not (name.startswith("seed") and name[4:].isdigit() and is_finished(folder)):
                    continue
                top1 = [float(row["eval_top1"]) for row in epoch_rows(folder)]
                marker = read_marker(folder)
                rows.append({"method": method, "pair": pair, "seed": int(name[4:]), "best_top1": max(top1),
                             "last_top1": top1[-1], "wall_s": round(marker["wall_s"], 1) if "wall_s" in marker else "",
                             "cpu": marker.get("cpu", ""), "date": marker.get("date", "")})
    return sorted(rows, key=lambda r: (r["pair"], list(METHODS).index(r["method"]), r["seed"]))


def read_results_csv(path):
    with open(path, newline="") as f:
        return [dict(row, seed=int(row["seed"]), best_top1=float(row["best_top1"]),
                     last_top1=float(row["last_top1"])) for row in csv.DictReader(f)]


def summarise(rows, column):
    """{(method, pair): (mean, sample std or nan for one seed, n)} of `column` over seeds."""
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["pair"]), []).append(row[column])
    return {key: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else math.nan, len(v))
            for key, v in groups.items()}


def ordered(rows):
    """(methods, pairs) present in `rows`: methods in the study's order, pairs in first appearance."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    return methods, list(dict.fromkeys(r["pair"] for r in rows))


def format_cell(stats):
    if stats is None:
        return "-"
    mean, std, n = stats
    return f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n=1)"


def write_table(rows, path):
    """table.md: mean +- sample std (n - 1) over seeds, per method (rows) and pair (columns)."""
    methods, pairs = ordered(rows)
    cpus = sorted({r["cpu"] for r in rows if r["cpu"]})
    dates = sorted({r["date"] for r in rows if r["date"]})
    span = f"{dates[0]} to {dates[-1]}" if dates else "unknown"
    lines = ["Top-1 (%) on the evaluation set, mean ± sample standard deviation over seeds (n seeds).",
             f"CPU: {'; '.join(cpus) or 'unknown'}. Dates: {span}.", ""]
    for column, title in (("last_top1", "Last epoch"),
                          ("best_top1", "Best epoch (chosen on the test set itself, so optimistic)")):
        stats = summarise(rows, column)
        lines += [f"{title}:", "", "| method | " + " | ".join(pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(format_cell(stats.get((m, p))) for p in pairs) + " |" for m in methods]
        lines.append("")
    atomic_write_text("\n".join(lines), path)


def plot_top1(rows, path):
    """top1.png: a panel per pair, last-epoch top-1 per method: mean with std error bars, and each seed."""
    methods, pairs = ordered(rows)
    stats = summarise(rows, "last_top1")
    panel_width = max(3.0, 0.7 * len(methods))
    fig = Figure(figsize=(1.0 + panel_width * len(pairs), 3.8))
    axes = fig.subplots(1, len(pairs), squeeze=False, sharey=True)
    for ax, pair in zip(axes[0], pairs):
        for x, method in enumerate(methods):
            if (method, pair) not in stats:
                continue
            mean, std, _ = stats[(method, pair)]
            ax.errorbar(x, mean, yerr=0.0 if math.isnan(std) else std, fmt="o", color="C0", capsize=4, markersize=7)
            seeds = [r["last_top1"] for r in rows if r["method"] == method and r["pair"] == pair]
            ax.plot([x + 0.18] * len(seeds), seeds, ".", color="0.5", markersize=5)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.set_title(pair.replace("-", "\n-> "), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%), last epoch")
    fig.suptitle("mean ± std over seeds (grey: each seed)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))


def aggregate(out):
    """results.csv, table.md and top1.png from the finished runs under `out`; the rows."""
    rows = collect_results(out)
    atomic_write_csv(rows, os.path.join(out, "results.csv"), RESULT_COLUMNS)
    if rows:
        write_table(rows, os.path.join(out, "table.md"))
        plot_top1(rows, os.path.join(out, "top1.png"))
    return rows


def cka_maps(out, teacher, teacher_checkpoint, pairs, seed, images):
    """cka_<pair>.png: CKA of the teacher against the CKA_METHODS students (first seed) found finished."""
    for pair in pairs:
        found = [(m, run_folder(out, pair, m, seed)) for m in CKA_METHODS]
        found = [(m, folder) for m, folder in found if is_finished(folder)]
        if not found:
            continue
        cka_main(["--teacher", teacher, "--teacher-checkpoint", teacher_checkpoint, "--images", str(images),
                  "--batch-size", str(min(100, images)), "--workers", "0",
                  "--student-checkpoint", *[os.path.join(f, "last.pth.tar") for _, f in found],
                  "--labels", *[m for m, _ in found], "--output", os.path.join(out, f"cka_{pair}.png"),
                  "--json", os.path.join(out, f"cka_{pair}.json")])


def run_grid(out, config, pairs, methods, seeds, teacher_checkpoint, extra):
    """Train every run of the grid that is not finished, seed-major (so an early stop leaves whole seeds),
    with a progress line per run and the outputs rewritten after each."""
    grid = [(pair, method, seed) for seed in seeds for pair in pairs for method in methods]
    cpu = cpu_model_name()
    for k, (pair, method, seed) in enumerate(grid, 1):
        folder = run_folder(out, pair, method, seed)
        head = f"[{k}/{len(grid)}] {pair} {method} seed {seed}"
        if is_finished(folder):
            print(f"{head}: finished before, skipped", flush=True)
            continue
        command = train_command(config, folder, pairs[pair], method, seed, teacher_checkpoint, extra)
        print(f"{head}: {'resuming' if os.path.isfile(os.path.join(folder, MARKER)) else 'starting'} ({folder})",
              flush=True)
        wall = train_one(command, folder, cpu)
        aggregate(out)
        finished = [run_folder(out, *job) for job in grid if is_finished(run_folder(out, *job))]
        walls = [read_marker(folder)["wall_s"] for folder in finished if "wall_s" in read_marker(folder)]
        left = len(grid) - len(finished)
        eta = format_seconds(statistics.mean(walls) * left) if walls else "?"
        print(f"{head}: done in {format_seconds(wall)}; {left} run(s) left, ETA {eta}", flush=True)


def study_settings(opts):
    """(config path, out folder, teacher, teacher checkpoint) resolved from the options and the config."""
    config = os.path.abspath(opts.config)
    values, _ = load_config(build_train_parser(DISTILLERS), config)
    teacher = values.get("teacher")
    if not teacher:
        raise UserError(f"config {opts.config!r} names no teacher (key `teacher`); the study distils from it")
    out = os.path.abspath(opts.out or values.get("output") or "output/study")
    checkpoint = opts.teacher_checkpoint or values.get("teacher_pretrained", "")
    checkpoint = checkpoint if os.path.isabs(checkpoint) else os.path.join(REPO, checkpoint)
    return config, out, teacher, checkpoint


@exit_cleanly_on_error
def main(argv=None):
    opts = build_parser().parse_args(argv)
    config, out, teacher, teacher_checkpoint = study_settings(opts)
    methods = opts.methods or (TINY_METHODS if opts.tiny else REQUIRED_METHODS)
    seeds = opts.seeds if opts.seeds is not None else (TINY_SEEDS if opts.tiny else SEEDS)
    cka_images = min(opts.cka_images, TINY_CKA_IMAGES) if opts.tiny else opts.cka_images
    unknown = [s for s in opts.students if not timm.is_model(s)]
    if unknown:
        raise UserError(f"--students {' '.join(unknown)}: not a timm or custom_model name (e.g. {' '.join(STUDENTS)})")
    pairs = {pair_name(teacher, s): s for s in opts.students}
    if not opts.aggregate_only and set(methods) - {"scratch"} and not os.path.isfile(teacher_checkpoint):
        raise UserError(f"teacher checkpoint {teacher_checkpoint!r} not found; pass --teacher-checkpoint PATH "
                        f"(the config's teacher_pretrained is the default)")
    os.makedirs(out, exist_ok=True)
    if not opts.aggregate_only:
        run_grid(out, config, pairs, methods, seeds, teacher_checkpoint, TINY_TRAIN_ARGS if opts.tiny else [])
    rows = aggregate(out)
    if cka_images and rows:
        cka_maps(out, teacher, teacher_checkpoint, pairs, min(seeds), cka_images)
    print(f"{len(rows)} finished run(s): {os.path.join(out, 'results.csv')}, table.md, top1.png", flush=True)
    return rows


if __name__ == "__main__":
    main()
