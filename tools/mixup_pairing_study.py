#!/usr/bin/env python3
"""What `--mixup-pairing sample` costs in accuracy against timm's batch pairing, on the offline demo's pair.

    python tools/mixup_pairing_study.py                       # 2 pairings x 3 seeds of the demo, ~3 min a run
    python tools/mixup_pairing_study.py --aggregate-only      # rebuild the table from the finished runs
    python tools/mixup_pairing_study.py --tiny --out /tmp/p   # a few steps on synthetic data

Each run is `bash train.sh`'s RSD demo (configs/demo/rsd.yaml) with `--mixup 0.8 --cutmix 1.0` added (the demo
recipe itself does not mix) and `--mixup-pairing batch` or `sample`. The runs go through the fidelity study's
runner: `<out>/<pairing>/<pair>/rsd/seed<k>`, finished runs skipped, interrupted ones resumed. Written to
`<out>`: `results.csv` (pairing, seed, last and best top-1, wall seconds, CPU, date) and `table.md` (mean ±
sample std over seeds per pairing).
"""
import argparse
import os

from kdcore.errors import exit_cleanly_on_error
from kdcore.io import atomic_write_csv, atomic_write_text
from tools import fidelity_study as study

CONFIG = os.path.join(study.REPO, "configs", "demo", "rsd.yaml")
TEACHER, STUDENT = "convnext_demo_32", "deit_demo_32"
MIXING = ["--mixup", "0.8", "--cutmix", "1.0"]
PAIRINGS, SEEDS = ("batch", "sample"), (0, 1, 2)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(study.REPO, "results", "mixup_pairing"), help="study folder")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; rebuild the outputs")
    p.add_argument("--tiny", action="store_true", help="one seed, a few steps on synthetic data")
    return p


def write_outputs(out, rows_by_pairing):
    rows = [dict(row, method=pairing) for pairing, rows in rows_by_pairing.items() for row in rows]
    columns = ("pairing", *[c for c in study.RESULT_COLUMNS if c != "method"])
    atomic_write_csv([{"pairing": r["method"], **{k: r[k] for k in columns[1:]}} for r in rows],
                     os.path.join(out, "results.csv"), columns)
    if not rows:
        return rows
    cpus = sorted({r["cpu"] for r in rows if r["cpu"]})
    dates = sorted({r["date"] for r in rows if r["date"]})
    span = f"{dates[0]} to {dates[-1]}" if dates else "unknown"
    lines = [f"RSD, {TEACHER} -> {STUDENT}, the demo recipe with {' '.join(MIXING)}: top-1 (%) on the evaluation set "
             "(Fashion-MNIST test set), mean ± sample standard deviation over seeds (n seeds).",
             f"CPU: {'; '.join(cpus) or 'unknown'}. Dates: {span}.",
             "", "| --mixup-pairing | last epoch | best epoch | seeds (last epoch) |", "|---|---|---|---|"]
    last, best = study.summarise(rows, "last_top1"), study.summarise(rows, "best_top1")
    for pairing in rows_by_pairing:
        seeds = ", ".join(f"{r['last_top1']:.2f}" for r in sorted(rows, key=lambda r: r["seed"])
                          if r["method"] == pairing)
        key = (pairing, study.pair_name(TEACHER, STUDENT))
        cells = " | ".join(study.format_cell(stats.get(key)) for stats in (last, best))
        lines.append(f"| {pairing} | {cells} | {seeds} |")
    atomic_write_text("\n".join(lines) + "\n", os.path.join(out, "table.md"))
    return rows


@exit_cleanly_on_error
def main(argv=None):
    opts = build_parser().parse_args(argv)
    out = os.path.abspath(opts.out)
    seeds = opts.seeds[:1] if opts.tiny else opts.seeds
    teacher_checkpoint = os.path.join(study.REPO, "pretrained", "convnext_demo_32_fmnist.pth")
    rows_by_pairing = {}
    for pairing in PAIRINGS:
        folder = os.path.join(out, pairing)
        extra = [*MIXING, "--mixup-pairing", pairing, *(study.TINY_TRAIN_ARGS if opts.tiny else [])]
        if not opts.aggregate_only:
            pairs = {study.pair_name(TEACHER, STUDENT): STUDENT}
            study.run_grid(folder, CONFIG, pairs, ["rsd"], seeds, teacher_checkpoint, extra)
        rows_by_pairing[pairing] = study.aggregate(folder) if os.path.isdir(folder) else []
    rows = write_outputs(out, rows_by_pairing)
    print(f"{len(rows)} finished run(s): {os.path.join(out, 'results.csv')}, table.md", flush=True)
    return rows


if __name__ == "__main__":
    main()
