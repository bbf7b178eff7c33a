#!/usr/bin/env python3
"""Measure each speed lever with tools/benchmark.py and print one Markdown table (the README's).

    python tools/benchmark_levers.py --out bench/ [--skip-compile] [benchmark.py options, e.g. --device cuda]

Every row is one benchmark run (vanilla, KD and RSD interleaved) in a process of its own, so that peak
memory is not inflated by an earlier row (freed memory stays in the process); ratios are taken within a run.
"""
import argparse
import json
import os
import subprocess
import sys

BENCHMARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py")

LEVERS = [
    ("teacher fp32", ["--teacher-precision", "fp32"]),
    ("teacher not frozen: autograd records it", ["--teacher-precision", "bf16", "--teacher-grad-mode", "grad"]),
    ("teacher bf16, no_grad", ["--teacher-precision", "bf16", "--teacher-grad-mode", "no_grad"]),
    ("teacher bf16, inference_mode", ["--teacher-precision", "bf16"]),
    ("teacher bf16 + channels_last", ["--teacher-precision", "bf16", "--channels-last"]),
    ("teacher bf16 + torch.compile", ["--teacher-precision", "bf16", "--compile"]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench", help="folder for one JSON file per lever")
    parser.add_argument("--skip-compile", action="store_true", help="skip torch.compile (minutes of compiling)")
    opts, passthrough = parser.parse_known_args()
    os.makedirs(opts.out, exist_ok=True)
    rows = []
    for index, (label, flags) in enumerate(LEVERS):
        if opts.skip_compile and "--compile" in flags:
            continue
        out = os.path.join(opts.out, f"lever{index}.json")
        subprocess.run([sys.executable, BENCHMARK, *passthrough, *flags, "--distillers", "kd", "rsd", "--json", out],
                       check=True)
        with open(out) as f:
            rows.append((label, {r["distiller"]: r for r in json.load(f)["results"]}))
    print("\n| lever | vanilla s/step | KD s/step | RSD s/step | RSD / KD | RSD / vanilla | RSD peak memory MB |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['vanilla']['s_per_step']:.3f} | {r['kd']['s_per_step']:.3f} | "
              f"{r['rsd']['s_per_step']:.3f} | {r['rsd']['s_per_step'] / r['kd']['s_per_step']:.3f} | "
              f"{r['rsd']['x_vanilla']:.2f} | {r['rsd']['peak_memory_mb']:.0f} |")
    with open(os.path.join(opts.out, "levers.json"), "w") as f:
        json.dump([{"lever": label, "results": r} for label, r in rows], f, indent=2)


if __name__ == "__main__":
    main()
