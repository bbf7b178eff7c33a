#!/usr/bin/env python3
"""Score a checkpoint on a dataset's validation split and print one JSON line.

Accepts this repo's training checkpoints (last/best.pth.tar, student_*.pth exports), timm train.py's
checkpoints (model_best.pth.tar), plain state dicts and .safetensors files:
    python validate.py data/cifar100 --dataset cifar100 --num-classes 100 \
        --model swin_tiny_patch4_window7_224 --checkpoint pretrained/swin_tiny_patch4_window7_224_cifar100.pth
Model name, class count and input size default to those stored in our or timm train.py's training checkpoints.
"""
import argparse
import json

import torch
from torch.utils.data import DataLoader

from engine.datasets import DATASET_KINDS, build_dataset, infer_dataset_kind
from engine.distributed import DistEnv
from engine.errors import UserError, exit_cleanly_on_user_error
from engine.loader import build_eval_transform, resolve_data_settings
from engine.loop import evaluate
from engine.models import count_parameters, create_model, load_weights, read_checkpoint
from engine.precision import AMP_DTYPES, autocast_context, default_device
from engine.train_args import add_data_arguments


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--model", default="", help="timm model name (default: the checkpoint's)")
    p.add_argument("--checkpoint", required=True, help="weights to score")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else the dataset's")
    p.add_argument("--use-ema", action="store_true", help="score the EMA weights of a training checkpoint")
    p.add_argument("--device", default=default_device())
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast")
    p.add_argument("--amp-dtype", default="bfloat16", choices=tuple(AMP_DTYPES))
    return p


def _fill_from_checkpoint(args, checkpoint):
    """Model name, class count and input size recorded in a training checkpoint (ours: a dict; timm's
    train.py: an argparse.Namespace), unless given."""
    recorded = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
    if isinstance(recorded, argparse.Namespace):  # timm train.py's checkpoints
        recorded = vars(recorded)
    args.model = args.model or recorded.get("model", "")
    if not args.model:
        raise UserError(f"{args.checkpoint!r} does not record its architecture; pass --model NAME")
    if recorded.get("model") == args.model:
        for key in ("num_classes", "img_size", "crop_pct", "interpolation", "mean", "std", "synthetic_val_size",
                    "synthetic_seed"):
            if getattr(args, key) in (None, "") and recorded.get(key) not in (None, ""):
                setattr(args, key, recorded[key])
        if recorded.get("dataset") in DATASET_KINDS:  # timm's own names ('torch/cifar100') are not ours
            args.dataset = args.dataset or recorded["dataset"]


@exit_cleanly_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    checkpoint = read_checkpoint(args.checkpoint)
    _fill_from_checkpoint(args, checkpoint)
    kind = args.dataset or infer_dataset_kind(args.data_dir)
    dataset = build_dataset(kind, args.data_dir, "val", args)
    num_classes = args.num_classes or dataset.num_classes
    model = create_model(args.model, num_classes=num_classes, img_size=args.img_size)
    load_weights(model, args.checkpoint, args.model, use_ema=args.use_ema, checkpoint=checkpoint)
    env = DistEnv(device=torch.device(args.device))
    model.to(env.device).eval()
    data_config = resolve_data_settings(args, model, dataset)
    dataset.transform = build_eval_transform(data_config)
    loader = DataLoader(dataset, batch_size=args.validation_batch_size or args.batch_size,
                        num_workers=args.workers, pin_memory=env.device.type == "cuda")
    metrics = evaluate(model, loader, env, autocast_context(args, env.device))
    print(json.dumps({"model": args.model, "checkpoint": args.checkpoint, "dataset": kind,
                      "num_samples": len(dataset), "top1": round(metrics["top1"], 3),
                      "top5": round(metrics["top5"], 3), "loss": round(metrics["loss"], 4),
                      "param_count": count_parameters(model), "img_size": data_config["input_size"][-1],
                      "use_ema": args.use_ema}), flush=True)
    return metrics


if __name__ == "__main__":
    main()
