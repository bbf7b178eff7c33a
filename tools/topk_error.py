#!/usr/bin/env python3
"""The KD loss a top-K teacher cache gives, against the full logits: the approximation `--cache-topk K` makes.

    python tools/topk_error.py --teacher T --teacher-checkpoint T.pth --student S --student-checkpoint S.pth \\
        --dataset synthetic --num-classes 100 --img-size 32 -k 10 --temperatures 1 4

Over the validation images it computes the teacher's logits, keeps the K largest and their log-sum-exp as the
cache does (engine/cache.py), fills the rest as the cache reads them back, and reports per temperature the KD
loss (T^2 KL(softmax(t / T) || softmax(s / T)), batch mean) with the full and with the filled logits: their mean
and the mean and largest relative error per batch, and the teacher's mean softmax mass outside its top K (what the
approximation spreads evenly).
"""
import argparse

import torch

import custom_model  # noqa: F401  (registers the repo's models with timm)
from distillers.kd import kd_loss
from engine.cache import fill_topk
from engine.loader import build_eval_loader, resolve_data_settings
from engine.models import create_model
from engine.train_args import add_data_arguments
from engine.weights import load_weights
from kdcore.io import atomic_write_json
from kdcore.machine import cpu_model_name


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-checkpoint", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--student-checkpoint", required=True)
    p.add_argument("-k", "--topk", type=int, default=10)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--json", default="")
    return p


def main(argv=None):
    opts = build_parser().parse_args(argv)
    from engine.datasets import build_dataset, infer_dataset_kind
    kind = opts.dataset or infer_dataset_kind(opts.data_dir)
    dataset = build_dataset(kind, opts.data_dir, "val", opts)
    classes = opts.num_classes or dataset.num_classes
    models = {}
    for role, name, path in (("teacher", opts.teacher, opts.teacher_checkpoint),
                             ("student", opts.student, opts.student_checkpoint)):
        models[role] = load_weights(create_model(name, num_classes=classes, img_size=opts.img_size), path, name,
                                    role=role).eval()
    loader = build_eval_loader(dataset, resolve_data_settings(opts, models["student"], dataset), opts.batch_size,
                               opts.workers, "cpu")
    losses = {t: {"full": [], "topk": []} for t in opts.temperatures}
    tails = []
    with torch.inference_mode():
        for images, _ in loader:
            teacher, student = models["teacher"](images).double(), models["student"](images).double()
            values, index = teacher.topk(opts.topk, dim=1)
            filled = fill_topk(values, index, teacher.logsumexp(dim=1, keepdim=True), classes)
            tails.append(float(1 - teacher.softmax(dim=1).gather(1, index).sum(dim=1).mean()))
            for t in opts.temperatures:
                losses[t]["full"].append(float(kd_loss(student, teacher, t)))
                losses[t]["topk"].append(float(kd_loss(student, filled, t)))
    report = {"cpu": cpu_model_name(), "k": opts.topk, "classes": classes, "images": len(dataset),
              "tail_mass": sum(tails) / len(tails), "temperatures": {}}
    print(f"teacher softmax mass outside its top {opts.topk} at T = 1: {report['tail_mass']:.2e} (mean over images)")
    for t, pair in losses.items():
        errors = [abs(a - b) / a for a, b in zip(pair["full"], pair["topk"])]
        row = {"kd_full": sum(pair["full"]) / len(pair["full"]), "kd_topk": sum(pair["topk"]) / len(pair["topk"]),
               "mean_relative_error": sum(errors) / len(errors), "max_relative_error": max(errors)}
        report["temperatures"][str(t)] = row
        print(f"T = {t:g}: KD loss {row['kd_full']:.5f} full, {row['kd_topk']:.5f} top-{opts.topk} of {classes}; "
              f"relative error per batch mean {row['mean_relative_error']:.2e}, max {row['max_relative_error']:.2e}")
    if opts.json:
        atomic_write_json(report, opts.json)
    return report


if __name__ == "__main__":
    main()
