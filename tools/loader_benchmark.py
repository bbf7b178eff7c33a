#!/usr/bin/env python3
"""Training-loader throughput: what `--mixup-pairing sample` costs the loader (a second view per sample).

    python tools/loader_benchmark.py                          # Fashion-MNIST at 32 px (the demo's loader)
    python tools/loader_benchmark.py --dataset synthetic --img-size 224 --synthetic-train-size 2048

For each pairing (`batch`: timm's Mixup, each image with its mirror; `sample`: each image with its own partner,
whose view is loaded too) it times `--batches` batches of the training loader, the views then normalised, erased
and mixed as the training step gets them (BatchBuilder), after one warm-up batch, and prints images per second
and the bytes a batch hands over. Any train.py data flag applies (`--aa`, `--reprob`, `--workers`, `-b`, ...).
"""
import argparse
import time

import timm
import torch

import custom_model  # noqa: F401  (registers the demo models with timm)
from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.loader import build_batch_builder, build_loaders, load_datasets, resolve_data_settings
from engine.train_args import build_train_parser
from kdcore.distributed import DistEnv
from kdcore.errors import exit_cleanly_on_error
from kdcore.machine import cpu_model_name

DEFAULTS = ["--dataset", "fashion_mnist", "--img-size", "32", "-b", "128", "--workers", "1", "--scale", "0.6", "1.0",
            "--mixup", "0.8", "--cutmix", "1.0"]


def time_pairing(argv, pairing, batches):
    args = parse_args_with_config(build_train_parser(DISTILLERS), [*argv, "--mixup-pairing", pairing])
    _, train_set, val_set = load_datasets(args)
    model = timm.create_model(args.model, num_classes=train_set.num_classes, img_size=args.img_size)
    config = resolve_data_settings(args, model, train_set)
    loader, _ = build_loaders(args, DistEnv(), train_set, val_set, config)
    builder = build_batch_builder(args, config, train_set.num_classes)
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    builder(next(iterator))  # warm-up: starts the workers
    images, handed_over, start = 0, 0, time.perf_counter()
    for _ in range(batches):
        views = next(iterator)
        handed_over += sum(t.numel() * t.element_size() for t in (views.images, views.noise))
        images += len(builder(views))
    seconds = time.perf_counter() - start
    return images / seconds, handed_over / batches


@exit_cleanly_on_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=40, help="timed batches per pairing")
    opts, data_flags = p.parse_known_args(argv)
    argv = [*DEFAULTS, "--model", "deit_demo_32", *data_flags]
    print(f"CPU: {cpu_model_name()}, torch threads {torch.get_num_threads()}; flags: {' '.join(argv)}")
    results = {pairing: time_pairing(argv, pairing, opts.batches) for pairing in ("batch", "sample")}
    for pairing, (rate, size) in results.items():
        print(f"--mixup-pairing {pairing:6s}: {rate:8.1f} img/s, {size / 2 ** 20:.2f} MiB handed over per batch")
    print(f"sample / batch: {results['sample'][0] / results['batch'][0]:.2f}x the images per second")


if __name__ == "__main__":
    main()
