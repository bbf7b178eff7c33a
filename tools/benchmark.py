#!/usr/bin/env python3
"""Time training steps of several distillers against plain training, in one process, on CPU or GPU.

    python tools/benchmark.py --student resnet18 --teacher swin_tiny_patch4_window7_224 --img-size 224 \
        --batch-size 32 --distillers kd rsd --steps 10 --teacher-precision bf16 --json bench.json

Each configuration runs the trainer's own `train_step` on a fixed random batch: `--warmup` untimed steps,
then `--steps` timed ones. Reports s/step, img/s, the ratio to vanilla, peak memory (RSS on CPU, max
allocated on GPU), student and extra parameters. Teachers are randomly initialised: speed does not depend
on their weights.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distillers import DISTILLERS, build_distiller  # noqa: E402
from engine.loop import autocast_context, train_step  # noqa: E402
from engine.models import count_parameters, create_model  # noqa: E402
from engine.teacher import FrozenTeacher  # noqa: E402
from engine.train_args import build_train_parser  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

GRAD_CONTEXTS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="swin_tiny_patch4_window7_224")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--distillers", nargs="+", default=["kd", "rsd"], choices=sorted(set(DISTILLERS) - {"vanilla"}))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--teacher-precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--teacher-grad-mode", default="inference_mode", choices=sorted(GRAD_CONTEXTS),
                   help="how the teacher forward disables autograd (to measure that lever)")
    p.add_argument("--amp", action="store_true", help="mixed precision for the student step")
    p.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the student step and the teacher")
    p.add_argument("--json", default="", help="also write the results here")
    return p


class PeakMemory:
    """Peak memory of one configuration: max allocated on CUDA; on Linux CPU the RSS high-water mark,
    reset by writing 5 to /proc/self/clear_refs."""

    def __init__(self, device):
        self.device = device

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")

    def read_mb(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, opts, teacher_model, train_args, device, memory):
    torch.manual_seed(0)
    train_args.distiller = name
    student = create_model(opts.student, num_classes=opts.num_classes, img_size=opts.img_size)
    distiller = build_distiller(name, student, teacher_model, train_args, torch.nn.CrossEntropyLoss())
    if opts.channels_last:
        distiller.to(memory_format=torch.channels_last)
    distiller.to(device).train()
    teacher = None
    if distiller.teacher_request is not None:
        teacher = FrozenTeacher(teacher_model, distiller.teacher_request, device, opts.teacher_precision,
                                compile=opts.compile, grad_context=GRAD_CONTEXTS[opts.teacher_grad_mode])
    if opts.compile:
        distiller.compile()
    optimizer = create_optimizer_v2(distiller, opt="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4)
    autocast = autocast_context(opts, device)
    images = torch.randn(opts.batch_size, 3, opts.img_size, opts.img_size, device=device)
    if opts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, opts.num_classes, (opts.batch_size,), device=device)

    memory.reset()
    for _ in range(opts.warmup):
        train_step(distiller, teacher, optimizer, images, targets, autocast=autocast)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(opts.steps):
        loss, _ = train_step(distiller, teacher, optimizer, images, targets, autocast=autocast)
    _synchronize(device)
    seconds = (time.perf_counter() - start) / opts.steps
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: loss is {loss.item()}")
    return {"distiller": name, "s_per_step": seconds, "img_per_s": opts.batch_size / seconds,
            "peak_memory_mb": memory.read_mb(), "student_params": count_parameters(student),
            "extra_params": distiller.extra_parameter_count()}


def main(argv=None):
    opts = build_parser().parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    train_args = build_train_parser(DISTILLERS).parse_args([])  # every distiller flag at its default
    teacher_model = create_model(opts.teacher, num_classes=opts.num_classes, img_size=opts.img_size)
    if opts.channels_last:
        teacher_model.to(memory_format=torch.channels_last)
    memory = PeakMemory(device)
    results = [measure(name, opts, teacher_model, train_args, device, memory)
               for name in ["vanilla", *opts.distillers]]
    for row in results:
        row["x_vanilla"] = row["s_per_step"] / results[0]["s_per_step"]

    device_name = device_description(device)
    header = (f"{opts.student} <- {opts.teacher}, {opts.img_size} px, batch {opts.batch_size}, {device.type} "
              f"({device_name}, {torch.get_num_threads()} threads), teacher {opts.teacher_precision}, "
              f"amp {opts.amp_dtype if opts.amp else 'off'}, channels_last {opts.channels_last}, "
              f"compile {opts.compile}, {opts.steps} steps after {opts.warmup} warm-up")
    print(header)
    print(f"{'distiller':<10} {'s/step':>8} {'img/s':>8} {'x vanilla':>10} {'peak MB':>9} {'student':>12} {'extra':>11}")
    for r in results:
        print(f"{r['distiller']:<10} {r['s_per_step']:>8.3f} {r['img_per_s']:>8.1f} {r['x_vanilla']:>10.2f} "
              f"{r['peak_memory_mb']:>9.0f} {r['student_params']:>12,} {r['extra_params']:>11,}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"settings": vars(opts), "device": device_name, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
