#!/usr/bin/env python3
"""Score a checkpoint on a dataset's validation split and print one JSON line.

Accepts this repo's training checkpoints (last/best.pth.tar, student_*.pth exports), timm train.py's
checkpoints (model_best.pth.tar), plain state dicts and .safetensors files:
    python validate.py data/cifar100 --dataset cifar100 --num-classes 100 \
        --model swin_tiny_patch4_window7_224 --checkpoint pretrained/swin_tiny_patch4_window7_224_cifar100.pth
Model name, class count, input size and --model-kwargs default to those stored in our training checkpoints
(model, class count and size also in timm train.py's).
`--results-file scores.csv` (or .json) also writes the printed record to a file, one row per model.
"""
import argparse
import json
import os

import torch
from timm.utils import ParseKwargs

from engine.datasets import DATASETS, build_dataset, infer_dataset_kind
from engine.loader import build_eval_loader, resolve_data_settings
from engine.loop import evaluate
from engine.models import count_parameters, create_model
from engine.plugins import add_import_argument, import_modules_of_command_line
from engine.train_args import add_data_arguments
from engine.weights import load_weights, read_checkpoint, recorded_args
from kdcore.distributed import DistEnv
from kdcore.errors import UserError, exit_cleanly_on_error
from kdcore.io import atomic_write_text, csv_text
from kdcore.precision import AMP_DTYPES, autocast_context, default_device


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    add_import_argument(p)
    p.add_argument("--model", default="", help="timm model name (default: the checkpoint's)")
    p.add_argument("--checkpoint", required=True, help="weights to score")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else the dataset's")
    p.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra keyword arguments of the model's timm constructor (default: the checkpoint's)")
    p.add_argument("--use-ema", action="store_true", help="score the EMA weights of a training checkpoint")
    p.add_argument("--device", default=default_device())
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast")
    p.add_argument("--amp-dtype", default="bfloat16", choices=tuple(AMP_DTYPES))
    p.add_argument("--channels-last", action="store_true", help="channels_last memory layout")
    p.add_argument("--results-file", default="", metavar="PATH",
                   help="also write the results to PATH: CSV or JSON, by its extension (.csv, .json)")
    return p


RESULTS_FORMATS = (".csv", ".json")


def check_results_file(path):
    """Refuse a --results-file that could not be written, before anything is evaluated."""
    if not path:
        return
    extension = os.path.splitext(path)[1].lower()
    if extension not in RESULTS_FORMATS:
        raise UserError(f"--results-file {path!r} must end in {' or '.join(RESULTS_FORMATS)} (the format is "
                        f"chosen by the extension)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--results-file {path!r}: folder {folder!r} does not exist; create it or pick another path")


def write_results(rows, path):
    """`rows` (one dict per model) as CSV or JSON, by the extension of `path`, written atomically."""
    if path.lower().endswith(".json"):
        text = json.dumps(rows, indent=2) + "\n"
    else:
        text = csv_text(rows)
    atomic_write_text(text, path)


def _fill_from_checkpoint(args, checkpoint):
    """Model name, class count, input size and model kwargs recorded in a training checkpoint (ours: a dict;
    timm's train.py: an argparse.Namespace), unless given."""
    recorded = recorded_args(checkpoint)
    args.model = args.model or recorded.get("model", "")
    if not args.model:
        raise UserError(f"{args.checkpoint!r} does not record its architecture; pass --model NAME")
    if recorded.get("model") == args.model:
        for key in ("num_classes", "img_size", "crop_pct", "interpolation", "mean", "std", "synthetic_val_size",
                    "synthetic_seed", "model_kwargs"):
            if getattr(args, key) in (None, "") and recorded.get(key) not in (None, ""):
                setattr(args, key, recorded[key])
        if recorded.get("dataset") in DATASETS:  # timm's own names ('torch/cifar100') are not ours
            args.dataset = args.dataset or recorded["dataset"]


@exit_cleanly_on_error
def main(argv=None):
    import_modules_of_command_line(argv)  # before the parser: their datasets are valid --dataset choices
    args = build_parser().parse_args(argv)
    check_results_file(args.results_file)
    checkpoint = read_checkpoint(args.checkpoint)
    _fill_from_checkpoint(args, checkpoint)
    kind = args.dataset or infer_dataset_kind(args.data_dir)
    dataset = build_dataset(kind, args.data_dir, "val", args)
    num_classes = args.num_classes or dataset.num_classes
    model = create_model(args.model, num_classes=num_classes, img_size=args.img_size, **(args.model_kwargs or {}))
    load_weights(model, args.checkpoint, args.model, use_ema=args.use_ema, checkpoint=checkpoint)
    env = DistEnv(device=torch.device(args.device))
    model.to(env.device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_settings(args, model, dataset)
    loader = build_eval_loader(dataset, data_config, args.validation_batch_size or args.batch_size, args.workers,
                               env.device)
    metrics = evaluate(model, loader, env, autocast_context(args, env.device), args.channels_last)
    record = {"model": args.model, "checkpoint": args.checkpoint, "dataset": kind, "num_samples": len(dataset),
              "top1": round(metrics["top1"], 3), "top5": round(metrics["top5"], 3), "loss": round(metrics["loss"], 4),
              "param_count": count_parameters(model), "img_size": data_config["input_size"][-1],
              "use_ema": args.use_ema}
    print(json.dumps(record), flush=True)
    if args.results_file:
        write_results([record], args.results_file)
    return metrics


if __name__ == "__main__":
    main()
