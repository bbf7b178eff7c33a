#!/usr/bin/env python3
"""Every CUDA path of a training run once, and the throughput a user will see, in one command and one JSON file.

    python tools/gpu_check.py --out results/gpu_check.json            # on one GPU: a few minutes
    python tools/gpu_check.py --cpu-dry --out /tmp/gpu_check.json     # anywhere: tiny models, 32 px, under 2 min

The checks, in this order (each reports "ok", or "failed" with its error; the exit code is 1 when one failed):
- nccl_process_group: an nccl group of one process, created explicitly (a run of one process makes none), one
  all-reduce, and one DDP step of an RSD distiller, whose loss and gradients must equal the same step's without DDP.
- amp_float16: training steps under --amp --amp-dtype float16: autocast computes in fp16, the GradScaler is on, the
  loss is finite, the scale is recorded.
- amp_bfloat16: the same under --amp --amp-dtype bfloat16 (no GradScaler).
- channels_last: training steps with --channels-last: the student's convolution weights stay channels-last.
- prefetch_loader: the loaders with random erasing on every image (--reprob 1): the training batches copied to the
  device on a side stream equal those copied without it, each image differs from its unerased view in part of it,
  and timm's PrefetchLoader (normalising on the device) gives the evaluation images torchvision's pipeline gives.
- pat: training steps of PAT under --amp (bf16): the prompted teacher pass through the engine; every beta moves
  from 0 and no gradient reaches the frozen teacher.
- check_cache: teacher caches of augmented views built by tools/build_cache.py on this device (fp16 and fp32), each
  checked by --check-cache against the live teacher at the build's batch size, the fp32 one also at a quarter of it;
  the largest deviations and the tolerance.
- throughput: img/s of ResNet18 <- Swin-T at 224 px, batch 128, --amp (bf16): vanilla, KD, RSD and PAT with the
  live teacher, and KD and RSD reading the fp16 teacher cache built by the previous check; medians of 20 interleaved
  steps after 5 warm-up (tools/benchmark.py's timing).
- compile: training steps with --compile; the loss must match the eager run's (amp_bfloat16) within 5%.
Each check records its peak memory (GPU: max allocated; CPU: the process's RSS high-water mark) and its seconds.
Teachers are randomly initialised and saved as checkpoints: no weights are downloaded, and no figure depends on them.

The CPU dry mode runs every check it can with tiny models (test_resnet <- test_vit) at 32 px: the process group
with gloo, the throughput and the caches on the tiny pair. The checks that need CUDA (the nccl group, fp16 with
its GradScaler, the CUDA img/s) report "needs CUDA", with the CPU stand-in's own status beside it where one ran;
compile is left to tests/test_compile.py. CI runs the dry mode.
"""
import argparse
import contextlib
import copy
import datetime
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import timm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distillers import DISTILLERS, build_distiller
from engine.cache import SourceCache
from engine.config import parse_args_with_config
from engine.datasets import build_dataset
from engine.loader import build_batch_builder, build_loaders, resolve_data_settings
from engine.loop import forward_backward
from engine.models import create_model
from engine.run import build_run
from engine.run_log import close_log
from engine.sources import FrozenSource
from engine.train_args import build_train_parser
from engine.trainer import train
from kdcore.batch import Batch
from kdcore.distributed import DistEnv
from kdcore.errors import UserError, exit_cleanly_on_error
from kdcore.io import atomic_write_json
from kdcore.machine import cpu_model_name
from tools import benchmark, build_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_CUDA = "needs CUDA"


class CheckFailed(Exception):
    """A check's expectation that did not hold (its message says which and by how much)."""


@dataclass
class Profile:
    """The models, sizes and counts of one mode."""

    device: torch.device
    student: str
    teacher: str
    img_size: int
    num_classes: int
    batch_size: int  # of the training-step checks
    train_size: int
    val_size: int
    workers: int
    bench_batch: int
    bench_warmup: int
    bench_steps: int
    cache_size: int  # training images of the teacher caches (one epoch each)
    cache_batch: int
    check_entries: int


def gpu_profile():
    return Profile(device=torch.device("cuda"), student="resnet18", teacher="swin_tiny_patch4_window7_224",
                   img_size=224, num_classes=100, batch_size=32, train_size=128, val_size=64, workers=8,
                   bench_batch=128, bench_warmup=5, bench_steps=20, cache_size=1024, cache_batch=128,
                   check_entries=64)


def dry_profile():
    return Profile(device=torch.device("cpu"), student="test_resnet", teacher="test_vit", img_size=32, num_classes=10,
                   batch_size=8, train_size=16, val_size=8, workers=0, bench_batch=8, bench_warmup=1, bench_steps=2,
                   cache_size=32, cache_batch=8, check_entries=8)


class Checker:
    """Runs the checks in order, each guarded, and rewrites the JSON after each one (a run cut short keeps what
    it measured)."""

    def __init__(self, profile, dry, out, work):
        self.profile, self.dry, self.out, self.work = profile, dry, out, work
        self.memory = benchmark.PeakMemory(profile.device)
        self.report = {"mode": "cpu-dry" if dry else "gpu", "device": benchmark.device_description(profile.device),
                       "host_cpu": cpu_model_name(), "date": datetime.date.today().isoformat(),
                       "commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "timm": timm.__version__, "threads": torch.get_num_threads(),
                       "models": f"{profile.student} <- {profile.teacher}, {profile.img_size} px", "checks": {}}
        self.teacher_weights = save_random_teacher(profile, work)
        self.results = {}  # what later checks read: the bf16 run's loss, the fp16 cache

    def run(self, name, check, needs_cuda=False, stand_in=None, skip=None):
        """Run `check()` (a dict of figures); under the dry mode a check that needs CUDA reports so, with its CPU
        `stand_in` run in its place if given, and `skip` (a reason) reports a check left out."""
        if self.dry and (needs_cuda or skip):
            entry = {"status": skip or NEEDS_CUDA}
            if stand_in is not None:
                entry["stand_in"] = self._guarded(name, stand_in)
        else:
            entry = self._guarded(name, check)
        self.report["checks"][name] = entry
        self.write()
        shown = entry["status"] + (f" (stand-in {entry['stand_in']['status']})" if "stand_in" in entry else "")
        print(f"[gpu_check] {name}: {shown}", flush=True)
        return entry

    def _guarded(self, name, check):
        self.memory.reset()
        start = time.perf_counter()
        try:
            entry = {"status": "ok", **check()}
        except Exception as exc:  # every failure is reported, and the other checks still run
            entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}
            print(entry["traceback"], file=sys.stderr, flush=True)
        finally:
            close_log()
        if self.profile.device.type == "cuda":
            torch.cuda.synchronize()
        entry["seconds"] = round(time.perf_counter() - start, 2)
        entry["peak_memory_mb"] = round(self.memory.read_mb(), 1)
        return entry

    def write(self):
        failed = [name for name, entry in self.report["checks"].items()
                  if entry["status"] == "failed" or entry.get("stand_in", {}).get("status") == "failed"]
        self.report["failed"] = failed
        atomic_write_json(self.report, self.out)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_random_teacher(profile, work):
    """A randomly initialised teacher saved as a checkpoint (--teacher-pretrained)."""
    torch.manual_seed(0)
    path = os.path.join(work, "teacher.pth")
    model = create_model(profile.teacher, num_classes=profile.num_classes, img_size=profile.img_size)
    torch.save(model.state_dict(), path)
    return path


def data_flags(profile, train_size=None, batch_size=None):
    return ["--dataset", "synthetic", "--img-size", profile.img_size, "--num-classes", profile.num_classes,
            "--synthetic-train-size", train_size or profile.train_size, "--synthetic-val-size", profile.val_size,
            "-b", batch_size or profile.batch_size, "--workers", profile.workers, "--device", profile.device.type,
            "--model", profile.student, "--teacher", profile.teacher]


def train_arguments(checker, name, *flags):
    profile = checker.profile
    argv = [*data_flags(profile), "--teacher-pretrained", checker.teacher_weights, "--distiller", "rsd",
            "--epochs", "1", "--warmup-epochs", "0", "--log-interval", "1", "--no-eval-teacher",
            "--output", os.path.join(checker.work, "runs"), "--experiment", name, *flags]
    return parse_args_with_config(build_train_parser(DISTILLERS), [str(a) for a in argv])


def autocast_dtype(run):
    """The dtype a matrix product takes under the run's autocast."""
    x = torch.ones(8, 8, device=run.env.device)
    with run.autocast():
        return str((x @ x).dtype).replace("torch.", "")


def trained(checker, name, *flags):
    """A run of one epoch with `flags`; the run and its figures (a finite training loss is required)."""
    run = build_run(train_arguments(checker, name, *flags))
    metrics = train(run)
    row = run.progress.history[-1]
    loss = row["train_loss"]
    if not math.isfinite(loss):
        raise CheckFailed(f"the training loss is {loss}")
    return run, {"train_loss": loss, "updates": run.progress.global_step, "val_top1": metrics["top1"],
                 "autocast_dtype": autocast_dtype(run)}


def expect_autocast(figures, dtype):
    if figures["autocast_dtype"] != dtype:
        raise CheckFailed(f"a matrix product under the run's autocast is {figures['autocast_dtype']}, not {dtype}")


def check_amp_float16(checker):
    run, figures = trained(checker, "amp_float16", "--amp", "--amp-dtype", "float16")
    expect_autocast(figures, "float16")
    if run.scaler is None or not run.scaler.is_enabled():
        raise CheckFailed("--amp --amp-dtype float16 built no enabled GradScaler")
    scale = run.scaler.get_scale()
    if not (math.isfinite(scale) and scale > 0):
        raise CheckFailed(f"the GradScaler's scale is {scale}")
    return {**figures, "grad_scale": scale}


def check_amp_bfloat16(checker):
    run, figures = trained(checker, "amp_bfloat16", "--amp", "--amp-dtype", "bfloat16")
    expect_autocast(figures, "bfloat16")
    if run.scaler is not None:
        raise CheckFailed("bf16 autocast built a GradScaler")
    checker.results["bf16_loss"] = figures["train_loss"]
    return figures


def check_channels_last(checker):
    run, figures = trained(checker, "channels_last", "--channels-last")
    convs = [m.weight for m in run.student.modules() if isinstance(m, torch.nn.Conv2d)]
    strided = [w.shape for w in convs if not w.is_contiguous(memory_format=torch.channels_last)]
    if not convs or strided:
        raise CheckFailed(f"{len(strided)} of {len(convs)} convolution weights are not channels-last after training")
    return {**figures, "channels_last_convs": len(convs)}


def check_pat(checker):
    """PAT's prompted teacher pass through the engine (attached source, staged forward, the teacher's precision)."""
    run, figures = trained(checker, "pat", "--distiller", "pat", "--amp", "--amp-dtype", "bfloat16")
    betas = {stage: block.beta.item() for stage, block in run.distiller.prompts.items()}
    if not all(beta != 0 and math.isfinite(beta) for beta in betas.values()):
        raise CheckFailed(f"PAT's betas did not move from 0: {betas}")
    if any(p.requires_grad or p.grad is not None for p in run.teacher.model.parameters()):
        raise CheckFailed("the frozen teacher's weights require or hold a gradient")
    return {**figures, "betas": betas, "extra_params": run.distiller.extra_parameter_count()}


def check_compile(checker):
    start = time.perf_counter()
    _, figures = trained(checker, "compile", "--amp", "--amp-dtype", "bfloat16", "--compile")
    eager = checker.results.get("bf16_loss")
    figures["run_seconds"] = round(time.perf_counter() - start, 1)
    if eager is not None:
        figures["eager_train_loss"] = eager
        if abs(figures["train_loss"] - eager) > 0.05 * abs(eager):
            raise CheckFailed(f"compiled loss {figures['train_loss']:.5f} vs eager {eager:.5f}: more than 5% apart")
    return figures


def loader_images(args, env, train_set, val_set, config, num_classes, prefetch):
    """The epoch-0 training images (as the step sees them) and the evaluation images of one loader build."""
    train_loader, val_loader = build_loaders(args, env, train_set, val_set, config, prefetch=prefetch)
    train_loader.sampler.set_epoch(0)
    builder = build_batch_builder(args, config, num_classes)
    train_images = torch.cat([builder(views).images.float().cpu() for views in train_loader])
    val_images = torch.cat([images.float().cpu() for images, _ in val_loader])
    return train_images, val_images, type(val_loader).__name__


def check_prefetch_loader(checker):
    profile = checker.profile
    args = train_arguments(checker, "loaders", "--reprob", "1.0")
    env = DistEnv(device=profile.device)
    train_set, val_set = build_dataset("synthetic", "", "train", args), build_dataset("synthetic", "", "val", args)
    config = resolve_data_settings(args, create_model(profile.student, num_classes=profile.num_classes), train_set)
    side, side_val, loader_name = loader_images(args, env, train_set, val_set, config, profile.num_classes, True)
    plain, plain_val, _ = loader_images(args, env, train_set, val_set, config, profile.num_classes, False)
    args.reprob = 0.0
    unerased, _, _ = loader_images(args, env, train_set, val_set, config, profile.num_classes, True)
    if loader_name != "PrefetchLoader":
        raise CheckFailed(f"the evaluation loader is {loader_name}, not timm's PrefetchLoader")
    if not torch.equal(side, plain):
        raise CheckFailed("training batches copied on a side stream differ from those copied without it")
    val_deviation = (side_val - plain_val).abs().max().item()
    if val_deviation > 1e-5:
        raise CheckFailed(f"PrefetchLoader's evaluation images deviate from torchvision's by {val_deviation:.2e}")
    erased = (side != unerased).flatten(1).float().mean(1)
    if not bool(((erased > 0) & (erased < 1)).all()):
        raise CheckFailed(f"random erasing at --reprob 1 changed between {erased.min():.3f} and {erased.max():.3f} "
                          f"of an image: every image should show one erased box and keep the rest")
    return {"train_images": len(side), "val_images": len(side_val), "val_max_deviation": val_deviation,
            "erased_fraction_mean": round(erased.mean().item(), 4)}


def small_distiller_step(device):
    """An RSD distiller of test_resnet <- test_vit at 32 px, its frozen teacher and a batch of 8."""
    train_args = build_train_parser(DISTILLERS).parse_args(["--distiller", "rsd", "--num-classes", "10"])
    torch.manual_seed(0)
    student = create_model("test_resnet", num_classes=10, img_size=32)
    teacher_model = create_model("test_vit", num_classes=10, img_size=32)
    distiller = build_distiller(train_args, student, input_size=(3, 32, 32), teacher=teacher_model,
                                dataset_size=8, train_labels=torch.arange(8) % 10).to(device).train()
    teacher = FrozenSource(teacher_model, distiller.teacher_request, device, "fp32")
    labels = torch.arange(8, device=device) % 10
    batch = Batch(images=torch.randn(8, 3, 32, 32, device=device), targets=labels, labels=labels,
                  index=torch.arange(8, device=device))
    return distiller, teacher, batch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_process_group(device, backend):
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        values = torch.arange(4.0, device=device)
        dist.all_reduce(values)
        if not torch.equal(values.cpu(), torch.arange(4.0)):
            raise CheckFailed(f"all_reduce over one process changed its tensor: {values.tolist()}")
        distiller, teacher, batch = small_distiller_step(device)
        reference = copy.deepcopy(distiller)
        wrapped = DistributedDataParallel(distiller, device_ids=[device.index or 0] if device.type == "cuda" else None)
        loss, _ = forward_backward(wrapped, teacher, batch, autocast=contextlib.nullcontext)
        reference_loss, _ = forward_backward(reference, teacher, batch, autocast=contextlib.nullcontext)
        if not torch.allclose(loss, reference_loss, rtol=1e-5, atol=1e-6):
            raise CheckFailed(f"the DDP step's loss {loss.item():.6f} differs from {reference_loss.item():.6f}")
        worst = max((a.grad - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-12)
                    for a, b in zip(distiller.parameters(), reference.parameters()) if b.grad is not None)
        if worst > 1e-4:
            raise CheckFailed(f"a DDP gradient deviates from the step without DDP by {worst:.2e} of its largest value")
        return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "ddp_loss": loss.item(),
                "grad_max_relative_deviation": worst}
    finally:
        dist.destroy_process_group()


def cache_arguments(checker, path, dtype):
    profile = checker.profile
    argv = ["--views", "augmented", *data_flags(profile, profile.cache_size, profile.cache_batch),
            "--teacher-pretrained", checker.teacher_weights, "--teacher-cache", path, "--epochs", "1",
            "--cache-dtype", dtype, "--store", "logits", "embedding"]
    return parse_args_with_config(build_cache.build_augmented_parser(), [str(a) for a in argv])


DEVIATION = re.compile(r"largest deviation (.+) of the largest value \(tolerance ([0-9.e+-]+), (fp\d+)\)")


def checked_cache(checker, args, path, batch_size):
    """--check-cache of a built cache at `batch_size`: {array: deviation}, tolerance, and whether it passed."""
    args = copy.copy(args)
    args.check_cache, args.batch_size = checker.profile.check_entries, batch_size
    try:
        report, passed = build_cache.check_built_cache(args, path), True
    except UserError as exc:
        report, passed = str(exc), False
    found = DEVIATION.search(report)
    if found is None:
        raise CheckFailed(f"--check-cache reported no deviation: {report}")
    deviations = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.e+-]+)", found[1])}
    return {"batch_size": batch_size, "largest_deviation": deviations, "tolerance": float(found[2]),
            "passed": passed}


def check_caches(checker):
    profile = checker.profile
    figures = {}
    for dtype in ("fp16", "fp32"):
        path = os.path.join(checker.work, f"cache_{dtype}")
        args = cache_arguments(checker, path, dtype)
        start = time.perf_counter()
        build_cache.build_augmented_cache(args)
        seconds = time.perf_counter() - start
        checks = [checked_cache(checker, args, path, profile.cache_batch)]
        if dtype == "fp32":
            checks.append(checked_cache(checker, args, path, max(profile.cache_batch // 4, 2)))
        figures[dtype] = {"views": profile.cache_size, "build_seconds": round(seconds, 2),
                          "teacher_precision": args.teacher_precision, "checks": checks}
        checker.results[f"cache_{dtype}"] = path
    refused = [f"{dtype} at batch {c['batch_size']}" for dtype, f in figures.items() for c in f["checks"]
               if not c["passed"]]
    if refused:
        raise CheckFailed(f"--check-cache refused the cache built on this device ({', '.join(refused)}): {figures}")
    return figures


def check_throughput(checker):
    profile = checker.profile
    path = checker.results.get("cache_fp16")
    if path is None:
        raise CheckFailed("no fp16 teacher cache was built (the check_cache check failed)")
    opts = benchmark.build_parser().parse_args([str(a) for a in [
        "--student", profile.student, "--teacher", profile.teacher, "--img-size", profile.img_size,
        "--num-classes", profile.num_classes, "-b", profile.bench_batch, "--distillers", "kd", "rsd", "pat",
        "--warmup", profile.bench_warmup, "--steps", profile.bench_steps, "--amp", "--amp-dtype", "bfloat16",
        "--device", profile.device.type, "--dataset-size", profile.cache_size, "--cached"]])
    opts.teacher_precision, reason = benchmark.resolve_teacher_precision(opts.teacher_precision, profile.device)
    rows = benchmark.run_benchmark(opts, profile.device, cache=SourceCache(path))
    return {"pair": f"{profile.student} <- {profile.teacher}", "img_size": profile.img_size,
            "batch_size": profile.bench_batch, "amp": "bfloat16", "teacher_precision": opts.teacher_precision,
            "teacher_precision_reason": reason, "warmup": profile.bench_warmup, "steps": profile.bench_steps,
            "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "step_seconds"}
                     for row in rows]}


def run_checks(checker):
    device = checker.profile.device
    checker.run("nccl_process_group", lambda: check_process_group(device, "nccl"), needs_cuda=True,
                stand_in=lambda: check_process_group(device, "gloo"))
    checker.run("amp_float16", lambda: check_amp_float16(checker), needs_cuda=True)
    checker.run("amp_bfloat16", lambda: check_amp_bfloat16(checker))
    checker.run("channels_last", lambda: check_channels_last(checker))
    checker.run("prefetch_loader", lambda: check_prefetch_loader(checker))
    checker.run("pat", lambda: check_pat(checker))
    checker.run("check_cache", lambda: check_caches(checker))
    checker.run("throughput", lambda: check_throughput(checker), needs_cuda=True,
                stand_in=lambda: check_throughput(checker))
    checker.run("compile", lambda: check_compile(checker),
                skip="skipped in the dry mode: tests/test_compile.py compiles on the CPU")


def print_summary(report):
    print(f"\n{report['mode']} check on {report['device']} (torch {report['torch']}, CUDA {report['cuda']}, "
          f"timm {report['timm']}), {report['models']}:")
    for name, entry in report["checks"].items():
        status = entry["status"] + (f", stand-in {entry['stand_in']['status']}" if "stand_in" in entry else "")
        timing = f"  {entry['seconds']:.1f} s, peak {entry['peak_memory_mb']:.0f} MB" if "seconds" in entry else ""
        print(f"  {name:<20} {status}{timing}")
    throughput = report["checks"].get("throughput", {})
    rows = throughput.get("rows") or throughput.get("stand_in", {}).get("rows") or []
    for row in rows:
        print(f"    {row['distiller']:<10} {row['img_per_s']:>9.1f} img/s  x{row['x_vanilla']:.2f} vanilla  "
              f"peak {row['peak_memory_mb']:.0f} MB")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry", action="store_true",
                   help="run what the CPU can (tiny models, 32 px, gloo); the CUDA-only checks report 'needs CUDA'")
    p.add_argument("--out", default="gpu_check.json", help="the JSON file written (rewritten after every check)")
    return p


@exit_cleanly_on_error
def main(argv=None):
    opts = build_parser().parse_args(argv)
    if not opts.cpu_dry and not torch.cuda.is_available():
        raise UserError(f"tools/gpu_check.py checks the CUDA paths, and torch {torch.__version__} sees no GPU "
                        f"(torch.cuda.is_available() is False); on a machine without one, run the CPU dry mode: "
                        f"python tools/gpu_check.py --cpu-dry")
    profile = dry_profile() if opts.cpu_dry else gpu_profile()
    if opts.out and os.path.dirname(os.path.abspath(opts.out)):
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        checker = Checker(profile, opts.cpu_dry, opts.out, work)
        run_checks(checker)
    checker.report["seconds"] = round(time.perf_counter() - start, 1)
    checker.write()
    print_summary(checker.report)
    print(f"written: {opts.out} ({checker.report['seconds']:.0f} s)")
    if checker.report["failed"]:
        print(f"failed: {', '.join(checker.report['failed'])}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
