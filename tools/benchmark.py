#!/usr/bin/env python3
"""Time training steps of several distillers against plain training, in one process, on CPU or GPU.

    python tools/benchmark.py --student resnet18 --teacher swin_tiny_patch4_window7_224 --img-size 224 \
        --batch-size 32 --distillers kd rsd --steps 10 --teacher-precision bf16 --json bench.json
    python tools/benchmark.py ... --distillers kd rsd --cached    # also each distiller from a teacher cache

Each configuration runs the trainer's own `train_step` on a fixed random batch: `--warmup` untimed steps
alone, then `--steps` timed steps interleaved with the other configurations. Reports the median s/step,
img/s, the ratio to vanilla, peak memory (process RSS on CPU, max allocated on GPU), student and extra
parameters. Teachers are randomly initialised: speed does not depend on their weights. With `--cached`, each
distiller also runs from a teacher-output cache (`--teacher-cache`: fp16 rows of `--dataset-size` views, random
values, read memory-mapped at random indices each step), with no teacher model; a distiller that needs the live
teacher (PAT) is timed live only.
"""
import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

import torch
from timm.optim import create_optimizer_v2

from distillers import DISTILLERS, build_distiller
from engine.cache import CacheWriter, SourceCache, dataset_identity
from engine.loop import train_step
from engine.models import count_parameters, create_model
from engine.sources import FrozenSource
from engine.teacher_cache import CachedTeacher
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.features import embedding_dim
from kdcore.machine import cpu_model_name
from kdcore.precision import AMP_DTYPES, TEACHER_PRECISIONS, autocast_context, default_device, resolve_teacher_precision

GRAD_CONTEXTS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="swin_tiny_patch4_window7_224")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dataset-size", type=int, default=50000,
                   help="training images the distillers assume (CRD's memory banks); CIFAR-100 has 50,000")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--distillers", nargs="+", default=["kd", "rsd"], choices=sorted(set(DISTILLERS) - {"vanilla"}))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=default_device())
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--teacher-precision", default="auto", choices=TEACHER_PRECISIONS)
    p.add_argument("--teacher-grad-mode", default="inference_mode", choices=sorted(GRAD_CONTEXTS),
                   help="the teacher forward's autograd mode, to measure that lever; 'grad' also leaves the "
                        "teacher's parameters trainable, as an unfrozen teacher would be")
    p.add_argument("--amp", action="store_true", help="mixed precision for the student step")
    p.add_argument("--amp-dtype", default="bfloat16", choices=tuple(AMP_DTYPES))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the student step and the teacher")
    p.add_argument("--cached", action="store_true", help="also time each distiller reading a teacher cache")
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
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TeacherUnderGradMode(FrozenSource):
    """The frozen teacher run under another autograd mode, to measure what inference_mode saves; 'grad' also
    makes its parameters trainable, so autograd records the forward as it would for an unfrozen teacher."""

    def __init__(self, *args, grad_mode, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_context = GRAD_CONTEXTS[grad_mode]
        if grad_mode == "grad":
            self.model.requires_grad_(True)

    def of_images(self, images):
        with self.grad_context():
            features = self.features(images)
        return features.detached_float()


class Configuration:
    """One distiller's student, extra modules, frozen teacher, optimizer and a fixed batch, ready to step."""

    def __init__(self, name, opts, teacher_model, train_args, device, cache=None):
        torch.manual_seed(0)
        train_args.distiller = name
        self.name, self.device, self.dataset_size = name + ("@cache" if cache else ""), device, opts.dataset_size
        if cache is not None:
            teacher_model = CachedTeacher(cache)
        self.student = create_model(opts.student, num_classes=opts.num_classes, img_size=opts.img_size)
        size = (3, opts.img_size, opts.img_size)
        train_args.num_classes = opts.num_classes
        self.distiller = build_distiller(train_args, self.student, input_size=size, teacher=teacher_model,
                                         dataset_size=opts.dataset_size,
                                         train_labels=torch.arange(opts.dataset_size) % opts.num_classes)
        if opts.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.distiller.to(device).train()
        self.teacher = None
        if cache is not None:
            self.teacher = teacher_model
        elif self.distiller.teacher_request is not None:
            source = FrozenSource if opts.teacher_grad_mode == "inference_mode" else TeacherUnderGradMode
            kwargs = {} if source is FrozenSource else {"grad_mode": opts.teacher_grad_mode}
            self.teacher = source(teacher_model, self.distiller.teacher_request, device, opts.teacher_precision,
                                  compile=opts.compile, **kwargs)
            self.distiller.attach_teacher(self.teacher)
        if opts.compile:
            self.distiller.compile()
        self.optimizer = create_optimizer_v2(self.distiller, opt="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4)
        self.autocast = autocast_context(opts, device)
        images = torch.randn(opts.batch_size, *size, device=device)
        if opts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, opts.num_classes, (opts.batch_size,), device=device)
        self.batch = Batch(images=images, targets=labels, labels=labels,
                           index=torch.arange(opts.batch_size, device=device))
        self.step_seconds, self.peak_memory_mb = [], None

    def step(self):
        self.batch.index = torch.randint(0, self.dataset_size, (len(self.batch),), device=self.device)
        loss, _ = train_step(self.distiller, self.teacher, self.optimizer, self.batch, autocast=self.autocast)
        return loss

    def timed_step(self):
        _synchronize(self.device)
        start = time.perf_counter()
        loss = self.step()
        _synchronize(self.device)
        self.step_seconds.append(time.perf_counter() - start)
        return loss

    def result(self, batch_size):
        seconds = statistics.median(self.step_seconds)
        return {"distiller": self.name, "s_per_step": seconds, "img_per_s": batch_size / seconds,
                "peak_memory_mb": self.peak_memory_mb, "student_params": count_parameters(self.student),
                "extra_params": self.distiller.extra_parameter_count(), "step_seconds": self.step_seconds}


def random_teacher_cache(opts, teacher_model, stack):
    """A teacher cache (format of --teacher-cache) of random fp16 rows, in a temporary folder kept open by `stack`."""
    folder = stack.enter_context(tempfile.TemporaryDirectory())
    widths = {"logits": opts.num_classes, "embedding": embedding_dim(teacher_model)}
    identity = dataset_identity(torch.arange(opts.dataset_size) % opts.num_classes, [])
    writer = CacheWriter(os.path.join(folder, "cache"), identity, {}, widths, views="augmented", dtype="fp16")
    generator = torch.Generator().manual_seed(0)
    for start in range(0, opts.dataset_size, 4096):
        n = min(4096, opts.dataset_size - start)
        writer.write({k: torch.randn(n, w, generator=generator) for k, w in widths.items()})
    return SourceCache(writer.finish())


def run_benchmark(opts, device, cache=None):
    """Warm up each configuration alone (its peak memory is read then), then time them interleaved, one
    step each per round, so that drift in the machine's speed hits every configuration alike. With `--cached`
    the cached configurations read `cache` (a `SourceCache` of `opts.dataset_size` views holding what the
    distillers read), or, when it is None, a cache of random rows made for the benchmark."""
    with contextlib.ExitStack() as stack:
        return _run_benchmark(opts, device, stack, cache)


def _run_benchmark(opts, device, stack, cache):
    train_args = build_train_parser(DISTILLERS).parse_args([])  # every distiller flag at its default
    teacher_model = create_model(opts.teacher, num_classes=opts.num_classes, img_size=opts.img_size)
    if opts.channels_last:
        teacher_model.to(memory_format=torch.channels_last)
    memory = PeakMemory(device)
    if opts.cached and cache is None:
        cache = random_teacher_cache(opts, teacher_model, stack)
    configs = []
    jobs = [(name, None) for name in ["vanilla", *opts.distillers]]
    if opts.cached:
        jobs += [(name, cache) for name in opts.distillers if not DISTILLERS[name].needs_live_teacher]
    for name, job_cache in jobs:
        config = Configuration(name, opts, teacher_model, train_args, device, job_cache)
        memory.reset()
        for _ in range(opts.warmup):
            config.step()
        _synchronize(device)
        config.peak_memory_mb = memory.read_mb()
        configs.append(config)
    for _ in range(opts.steps):
        for config in configs:
            loss = config.timed_step()
            if not torch.isfinite(loss):
                raise RuntimeError(f"{config.name}: loss is {loss.item()}")
    results = [config.result(opts.batch_size) for config in configs]
    for row in results:
        row["x_vanilla"] = row["s_per_step"] / results[0]["s_per_step"]
    return results


def main(argv=None):
    opts = build_parser().parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    opts.teacher_precision, reason = resolve_teacher_precision(opts.teacher_precision, device)
    results = run_benchmark(opts, device)

    device_name = device_description(device)
    header = (f"{opts.student} <- {opts.teacher}, {opts.img_size} px, batch {opts.batch_size}, {device.type} "
              f"({device_name}, {torch.get_num_threads()} threads), teacher {opts.teacher_precision} ({reason}), "
              f"amp {opts.amp_dtype if opts.amp else 'off'}, channels_last {opts.channels_last}, "
              f"compile {opts.compile}, median of {opts.steps} interleaved steps after {opts.warmup} warm-up")
    print(header)
    print(f"{'distiller':<10} {'s/step':>8} {'img/s':>8} {'x vanilla':>10} {'peak MB':>9} {'student':>12} "
          f"{'extra':>11}")
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
