#!/usr/bin/env python3
"""Check that a refactor changes no number: train every distiller case for 3 steps with a fixed seed in two
checkouts (e.g. a commit and its parent) and compare the saved tensors exactly.

    git worktree add /tmp/parent HEAD~1
    python tools/same_numbers.py run --tree /tmp/parent --out /tmp/same/parent
    python tools/same_numbers.py run --tree .           --out /tmp/same/new --initial-from /tmp/same/parent
    python tools/same_numbers.py compare /tmp/same/parent /tmp/same/new

`run` trains each case through the tree's own `train.py` on the synthetic dataset (a BatchNorm CNN student,
test_resnet, from a token teacher, test_vit, both random-init checkpoints written once under OUT/fixtures with
plain timm), once in fp32 and once under `--amp --amp-dtype bfloat16`. `compare` requires `student_last.pth`
and the distiller state of `last.pth.tar` to be equal tensor for tensor (`torch.equal`), with the distiller
state keys mapped by KEY_RENAMES where a commit renamed them.

RichKD with a live second source builds that source's model at another point of the run in a commit that moves
its construction, so its random init differs (its checkpoint overwrites it anyway, but the distiller's own
heads are drawn after it). For those cases the first tree saves its distiller's initial state
(`initial_distiller.pt`), and `run --initial-from` loads it into the second tree's build before one step.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

SEED_ARGS = ["--dataset", "synthetic", "--img-size", "32", "--workers", "1", "--synthetic-val-size", "8",
             "--log-interval", "1", "--epochs", "1", "--seed", "7", "--teacher-precision", "fp32",
             "--model", "test_resnet", "--teacher", "test_vit", "-b", "8"]
THREE_STEPS = ["--synthetic-train-size", "24"]
ONE_STEP = ["--synthetic-train-size", "8"]
PRECISIONS = {"fp32": [], "bf16": ["--amp", "--amp-dtype", "bfloat16"]}
LIVE = ["--richkd-source", "test_resnet", "--richkd-source-pretrained", "{fixtures}/source.pth"]
CACHE = ["--richkd-cache", "{fixtures}/cache"]
# case name -> (train.py flags, whether the distiller's initial state is carried over and only one step taken)
CASES = {
    **{name: (["--distiller", name], False)
       for name in ("vanilla", "kd", "bkd", "dkd", "dist", "correlation", "rkd", "fitnet", "rsd", "ofa", "crd", "pat")},
    "rsd_logits": (["--distiller", "rsd", "--rsd-target", "logits"], False),
    "rsd_branches": (["--distiller", "rsd", "--rsd-branch-stage", "1", "2", "3", "4"], False),
    "ofa_rsd": (["--distiller", "ofa", "--ofa-criterion", "rsd"], False),
    **{f"richkd_{mode}_cache": (["--distiller", "richkd", "--richkd-mode", mode, *CACHE], False)
       for mode in ("L", "F", "LF")},
    "richkd_L_live": (["--distiller", "richkd", "--richkd-mode", "L", *LIVE], False),
    **{f"richkd_{mode}_live": (["--distiller", "richkd", "--richkd-mode", mode, *LIVE], True) for mode in ("F", "LF")},
}
# Distiller state keys a commit renamed: (methods, {old key or prefix ending in ".": new}); CRD's contrastive part
# became a component, `contrast`, in both methods that own it.
KEY_RENAMES = [(("crd", "richkd"), {"embed_s.": "contrast.embed_s.", "embed_t.": "contrast.embed_t.",
                                    "memory_student": "contrast.memory_student",
                                    "memory_teacher": "contrast.memory_teacher", "z": "contrast.z",
                                    "step": "contrast.step"})]

# Run inside the tree's train.py process: dump or load the distiller's initial state around the build.
HOOK = r"""
import sys, runpy, torch
import engine.run as run
mode, path = sys.argv.pop(1), sys.argv.pop(1)
build = run.build_distiller_for
def hooked(*a, **k):
    distiller = build(*a, **k)
    if mode == "dump":
        torch.save(distiller.extra_state_dict(), path)
    else:
        import importlib.util
        spec = importlib.util.spec_from_file_location("same_numbers", {this_file!r})
        same_numbers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(same_numbers)
        distiller.load_extra_state_dict(same_numbers.mapped(torch.load(path), {case!r}))
    return distiller
run.build_distiller_for = hooked
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def mapped(state, case):
    """The distiller state of `case` with the first tree's keys renamed as the second tree names them."""
    renames = {old: new for methods, table in KEY_RENAMES if case.startswith(methods) for old, new in table.items()}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key == old or (old.endswith(".") and key.startswith(old)):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def write_fixtures(tree, folder):
    """Random-init teacher and second-source checkpoints (plain timm) and the second source's cache."""
    import timm
    os.makedirs(folder, exist_ok=True)
    for file, name, seed, kwargs in (("teacher.pth", "test_vit", 0, {"img_size": 32}),
                                     ("source.pth", "test_resnet", 1, {})):
        torch.manual_seed(seed)
        torch.save(timm.create_model(name, num_classes=10, **kwargs).state_dict(), os.path.join(folder, file))
    if not os.path.isdir(os.path.join(folder, "cache")):
        subprocess.run([sys.executable, "tools/build_cache.py", "--dataset", "synthetic", "--synthetic-train-size",
                        "24", "--source", "test_resnet", "--weights", os.path.join(folder, "source.pth"),
                        "--img-size", "32", "--output", os.path.join(folder, "cache"), "--device", "cpu"],
                       cwd=tree, env=dict(os.environ, PYTHONPATH=tree), check=True, capture_output=True)


def run_cases(args):
    tree, out = os.path.abspath(args.tree), os.path.abspath(args.out)
    fixtures = os.path.abspath(args.fixtures or os.path.join(out, "fixtures"))
    write_fixtures(tree, fixtures)
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    names = args.cases or list(CASES)
    for i, name in enumerate(names):
        flags, carry_initial = CASES[name]
        for precision, precision_flags in PRECISIONS.items():
            folder = os.path.join(out, "runs")
            experiment = f"{name}-{precision}"
            if os.path.exists(os.path.join(folder, experiment, "last.pth.tar")):
                continue
            command = [*SEED_ARGS, *(ONE_STEP if carry_initial else THREE_STEPS), *precision_flags,
                       *[f.format(fixtures=fixtures) for f in flags], "--teacher-pretrained",
                       os.path.join(fixtures, "teacher.pth"), "--output", folder, "--experiment", experiment]
            prefix = [sys.executable, "train.py"]
            if carry_initial:
                initial = os.path.join(folder, experiment + ".initial.pt")
                mode = "dump"
                if args.initial_from:
                    mode, initial = "load", os.path.join(os.path.abspath(args.initial_from), "runs",
                                                          experiment + ".initial.pt")
                os.makedirs(folder, exist_ok=True)
                hook = HOOK.replace("{this_file!r}", repr(os.path.abspath(__file__))).replace(
                    "{case!r}", repr(name))
                prefix = [sys.executable, "-c", hook, mode, initial]
            start = time.time()
            done = subprocess.run([*prefix, *command], cwd=tree, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} {precision} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
            print(f"[{i + 1}/{len(names)}] {name} {precision}: {time.time() - start:.1f} s", flush=True)


def compare(args):
    first, second = (os.path.join(os.path.abspath(f), "runs") for f in (args.first, args.second))
    failures = 0
    for name in CASES:
        for precision in PRECISIONS:
            a, b = (os.path.join(f, f"{name}-{precision}") for f in (first, second))
            if not all(os.path.isfile(os.path.join(f, "last.pth.tar")) for f in (a, b)):
                print(f"MISSING {name:<17} {precision:<5} (not trained in both)")
                failures += 1
                continue
            pairs = [("student_last.pth", torch.load(os.path.join(a, "student_last.pth")),
                      torch.load(os.path.join(b, "student_last.pth"))),
                     ("distiller state", mapped(torch.load(os.path.join(a, "last.pth.tar"), weights_only=False)
                                                ["distiller_extra"], name),
                      torch.load(os.path.join(b, "last.pth.tar"), weights_only=False)["distiller_extra"])]
            verdicts = []
            for what, x, y in pairs:
                if x.keys() != y.keys():
                    verdicts.append(f"{what}: keys differ ({sorted(set(x) ^ set(y))[:4]})")
                    continue
                unequal = [k for k in x if not torch.equal(x[k], y[k])]
                verdicts.append(f"{what}: {len(x)} tensors " + (f"{len(unequal)} DIFFER ({unequal[:3]})"
                                                                  if unequal else "equal"))
            bad = any("DIFFER" in v or "differ" in v for v in verdicts)
            failures += bad
            print(f"{'FAIL' if bad else 'same'} {name:<20} {precision:<5} " + "; ".join(verdicts))
    print(f"{failures} case(s) differ" if failures else "every case equal tensor for tensor")
    return 1 if failures else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train every case in one checkout")
    r.add_argument("--tree", required=True, help="the checkout whose train.py runs")
    r.add_argument("--out", required=True, help="folder for its runs (cases already there are kept)")
    r.add_argument("--fixtures", default="", help="teacher/source checkpoints and cache (default: OUT/fixtures)")
    r.add_argument("--initial-from", default="", help="the first tree's OUT: load its RichKD live initial states")
    r.add_argument("--cases", nargs="*", choices=list(CASES), help="default: all")
    c = sub.add_parser("compare", help="compare two `run` folders tensor for tensor")
    c.add_argument("first")
    c.add_argument("second")
    args = p.parse_args()
    if args.command == "run":
        run_cases(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
