#!/usr/bin/env python3
"""What `--mixup-pairing sample` costs in accuracy against timm's batch pairing, on the offline demo's pair.

    python tools/mixup_pairing_study.py                       # 2 pairings x 3 seeds of the demo, ~3 min a run
    python tools/mixup_pairing_study.py --aggregate-only      # rebuild the table from the finished runs
    python tools/mixup_pairing_study.py --tiny --out /tmp/p   # a few steps on synthetic data

Each run is `bash train.sh`'s RSD demo (configs/demo/rsd.yaml) with `--mixup 0.8 --cutmix 1.0` added (the demo
recipe itself does not mix) and `--mixup-pairing batch` or `sample`. The runs go through the fidelity study's
runner (tools/study_runs.py): `<out>/<pairing>/runs/...`, finished runs skipped, interrupted ones resumed, the
teacher live (a cache cannot serve batch pairing). Written to `<out>`: `results.csv` (pairing, seed, last and best
top-1 on the evaluation set, wall seconds, CPU, date) and `table.md` (mean ± sample std over seeds per pairing).
"""
import argparse
import os

import yaml

from kdcore.errors import exit_cleanly_on_error
from kdcore.io import atomic_write_csv, atomic_write_text
from tools.study_report import format_cell
from tools.study_runs import REPO, RunSpec, Study, epoch_rows, is_done, read_marker, run_jobs

CONFIG = os.path.join(REPO, "configs", "demo", "rsd.yaml")
TEACHER, STUDENT = "convnext_demo_32", "deit_demo_32"
MIXING = ["--mixup", "0.8", "--cutmix", "1.0"]
PAIRINGS, SEEDS = ("batch", "sample"), (0, 1, 2)
COLUMNS = ("pairing", "pair", "seed", "best_top1", "last_top1", "wall_s", "cpu", "date")
TINY_TRAIN_ARGS = ["--dataset", "synthetic", "--synthetic-train-size", "128", "--synthetic-val-size", "32",
                   "-b", "16", "--workers", "0", "--log-interval", "1", "--warmup-epochs", "0"]
TINY_SCHEDULE = (64, 1)  # training images, epochs


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "results", "mixup_pairing"), help="study folder")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; rebuild the outputs")
    p.add_argument("--tiny", action="store_true", help="one seed, a few steps on synthetic data")
    return p


def result_row(study, pairing, run):
    folder = run.folder(study.out)
    top1 = [float(r["eval_top1"]) for r in epoch_rows(folder)]
    marker = read_marker(folder)
    return {"pairing": pairing, "pair": run.pair, "seed": run.seed, "best_top1": max(top1), "last_top1": top1[-1],
            "wall_s": round(marker["wall_s"], 1) if "wall_s" in marker else "", "cpu": marker.get("cpu", ""),
            "date": marker.get("date", "")}


def write_outputs(out, rows):
    atomic_write_csv(rows, os.path.join(out, "results.csv"), COLUMNS)
    if not rows:
        return rows
    cpus = sorted({r["cpu"] for r in rows if r["cpu"]})
    dates = sorted({r["date"] for r in rows if r["date"]})
    span = f"{dates[0]} to {dates[-1]}" if dates else "unknown"
    lines = [f"RSD, {TEACHER} -> {STUDENT}, the demo recipe with {' '.join(MIXING)}: top-1 (%) on the evaluation set "
             "(Fashion-MNIST test set), mean ± sample standard deviation over seeds (n seeds).",
             f"CPU: {'; '.join(cpus) or 'unknown'}. Dates: {span}.",
             "", "| --mixup-pairing | last epoch | best epoch | seeds (last epoch) |", "|---|---|---|---|"]
    for pairing in PAIRINGS:
        mine = sorted((r for r in rows if r["pairing"] == pairing), key=lambda r: r["seed"])
        if mine:
            seeds = ", ".join(f"{r['last_top1']:.2f}" for r in mine)
            cells = " | ".join(format_cell([r[c] for r in mine]) for c in ("last_top1", "best_top1"))
            lines.append(f"| {pairing} | {cells} | {seeds} |")
    atomic_write_text("\n".join(lines) + "\n", os.path.join(out, "table.md"))
    return rows


@exit_cleanly_on_error
def main(argv=None):
    opts = build_parser().parse_args(argv)
    out = os.path.abspath(opts.out)
    seeds = opts.seeds[:1] if opts.tiny else opts.seeds
    with open(CONFIG) as f:
        recipe = yaml.safe_load(f)
    size, epochs = TINY_SCHEDULE if opts.tiny else (recipe.get("train_subset") or 0, recipe["epochs"])
    teacher_checkpoint = os.path.join(REPO, "pretrained", "convnext_demo_32_fmnist.pth")
    rows = []
    for pairing in PAIRINGS:
        study = Study(CONFIG, os.path.join(out, pairing), {TEACHER: (TEACHER, teacher_checkpoint)},
                      cache_student=STUDENT, data_args=["--dataset", "synthetic" if opts.tiny else recipe["dataset"]],
                      extra=[*MIXING, "--mixup-pairing", pairing, *(TINY_TRAIN_ARGS if opts.tiny else [])],
                      cached_methods=())
        runs = [RunSpec(f"{TEACHER}-{STUDENT}", STUDENT, "rsd", (), size, epochs, seed) for seed in seeds]
        if not opts.aggregate_only:
            run_jobs(study, runs, opts.jobs)
        rows += [result_row(study, pairing, run) for run in runs if is_done(study, run)]
    write_outputs(out, rows)
    print(f"{len(rows)} finished run(s): {os.path.join(out, 'results.csv')}, table.md", flush=True)
    return rows


if __name__ == "__main__":
    main()
