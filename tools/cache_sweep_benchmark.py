#!/usr/bin/env python3
"""What a teacher-output cache saves a sweep: one cache build plus M cached runs, against M live-teacher runs.

    python tools/cache_sweep_benchmark.py                                   # ResNet18 <- Swin-T, 224 px, 4 methods
    python tools/cache_sweep_benchmark.py --images 64 --img-size 32 --student resnet18 --teacher test_vit  # quick

Every run is a real `train.py` process on the same synthetic training set (`--images` images, 1 epoch, -b
`--batch-size`, one validation batch, the teacher with random weights saved to a file: speed does not depend on
them), so start-up is in both sides. Reported: the wall time of each live run, of the build and of each cached run;
the measured speed-up (sum of live runs) / (build + sum of cached runs); the build against the same command with
`--dry-run` (loader and teacher forward, nothing written); and, given `--step-json` (the interleaved
step benchmark of tools/benchmark.py on the same pair), the bound M (s + t) / (M s + b), with s the vanilla step,
t the live KD step minus it (the teacher forward) and b the build's wall time per step.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from engine.models import create_model
from kdcore.io import atomic_write_json
from kdcore.machine import cpu_model_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("kd", "dkd", "dist", "rsd")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="swin_tiny_patch4_window7_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=640, help="training images: one epoch of each run")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--teacher-precision", default="fp32")
    p.add_argument("--step-json", default="", help="tools/benchmark.py --json of the same pair, for s and t")
    p.add_argument("--json", default="", help="also write the figures here")
    return p


def timed(command):
    """Wall seconds of one command run in the repo (it must succeed)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv=None):
    opts = build_parser().parse_args(argv)
    work = tempfile.mkdtemp(prefix="cache_sweep_")
    torch.manual_seed(0)
    checkpoint = os.path.join(work, "teacher.pth")
    torch.save(create_model(opts.teacher, num_classes=100, img_size=opts.img_size).state_dict(), checkpoint)
    common = ["--dataset", "synthetic", "--synthetic-train-size", str(opts.images), "--synthetic-val-size",
              str(opts.batch_size), "--num-classes", "100", "--img-size", str(opts.img_size), "-b",
              str(opts.batch_size), "--epochs", "1", "--model", opts.student, "--workers", "2", "--warmup-epochs",
              "0", "--log-interval", "1", "--teacher-precision", opts.teacher_precision, "--no-eval-teacher",
              "--mixup", "0.8", "--cutmix", "1.0", "--mixup-pairing", "sample", "--output", work]
    teacher = ["--teacher", opts.teacher, "--teacher-pretrained", checkpoint]
    cache = os.path.join(work, "cache")
    figures = {"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "settings": vars(opts), "live": {},
               "cached": {}}
    steps = opts.images // opts.batch_size
    for method in opts.methods:
        wall = timed([sys.executable, "train.py", *common, *teacher, "--distiller", method,
                      "--experiment", f"live_{method}"])
        figures["live"][method] = wall
        print(f"live {method}: {wall:.1f} s", flush=True)
    wall = timed([sys.executable, "tools/build_cache.py", "--views", "augmented", *common, *teacher,
                  "--teacher-cache", cache, "--store", "logits", "embedding"])
    figures["build"] = wall
    print(f"build: {wall:.1f} s", flush=True)
    figures["build_dry_run"] = timed([sys.executable, "tools/build_cache.py", "--views", "augmented", *common, *teacher,
                                      "--teacher-cache", cache + "_dry", "--store", "logits", "embedding",
                                      "--dry-run"])
    print(f"the same build writing nothing: {figures['build_dry_run']:.1f} s (build / dry run "
          f"{figures['build'] / figures['build_dry_run']:.2f}x)", flush=True)
    for method in opts.methods:
        wall = timed([sys.executable, "train.py", *common, "--teacher-cache", cache, "--distiller", method,
                      "--experiment", f"cached_{method}"])
        figures["cached"][method] = wall
        print(f"cached {method}: {wall:.1f} s", flush=True)
    live, cached = sum(figures["live"].values()), figures["build"] + sum(figures["cached"].values())
    figures["speedup"] = live / cached
    print(f"{len(opts.methods)}-method sweep over {opts.images} images ({steps} steps a run): live {live:.1f} s, "
          f"build + cached {cached:.1f} s, speed-up {figures['speedup']:.2f}x")
    if opts.step_json:
        with open(opts.step_json) as f:
            rows = {r["distiller"]: r["s_per_step"] for r in json.load(f)["results"]}
        s, t, b, m = rows["vanilla"], rows["kd"] - rows["vanilla"], figures["build"] / steps, len(opts.methods)
        figures["bound"] = m * (s + t) / (m * s + b)
        figures.update(s=s, t=t, b=b)
        print(f"bound M (s + t) / (M s + b) = {figures['bound']:.2f}x (s {s:.3f} s, t {t:.3f} s from the step "
              f"benchmark, b {b:.3f} s: the build's wall time per step, start-up included); measured / bound = "
              f"{figures['speedup'] / figures['bound']:.2f}")
    if opts.json:
        atomic_write_json(figures, opts.json)
    return figures


if __name__ == "__main__":
    main()
