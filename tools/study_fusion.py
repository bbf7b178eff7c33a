#!/usr/bin/env python3
"""RichKD's fused logits on their own: the test top-1 of a task teacher, a second source and their fusion
alpha * z_T + (1 - alpha) * z_C (distillers/richkd.py `fuse`, the logits RichKD (L) distils), on the validation
(test) split, every model seeing the same batches.

    python tools/study_fusion.py --dataset fashion_mnist \
        --teacher convnext_demo_32 --teacher-checkpoint pretrained/convnext_demo_32_fmnist.pth \
        --source swin_demo_32 --source-checkpoint pretrained/swin_demo_32_fmnist.pth --alpha 0.7 --json fusion.json

Both models are timm (or custom_model) names with local weights; the inputs are normalised with the dataset's
mean/std at each model's input size (the study's models share them, so one transform serves both).
"""
import argparse
import json

import torch
from torch.utils.data import DataLoader

import custom_model  # noqa: F401  (registers the demo models with timm)
from distillers.richkd import fuse
from engine.datasets import build_dataset
from engine.loader import build_eval_transform, resolve_data_settings, worker_processes
from engine.models import create_model
from engine.train_args import add_data_arguments
from engine.weights import load_weights
from kdcore.errors import UserError, exit_cleanly_on_error
from kdcore.io import atomic_write_text, file_sha256


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.set_defaults(batch_size=250, workers=0)
    p.add_argument("--teacher", required=True, help="timm model name of the task teacher")
    p.add_argument("--teacher-checkpoint", required=True)
    p.add_argument("--source", required=True, help="timm model name of the second source")
    p.add_argument("--source-checkpoint", required=True)
    p.add_argument("--num-classes", type=int, default=None, help="default: the dataset's")
    p.add_argument("--alpha", type=float, default=0.7, help="the task teacher's fusion weight (RichKD's 0.7)")
    p.add_argument("--json", default="", help="also write the scores here")
    return p


def load(name, path, role, num_classes, img_size):
    model = create_model(name, num_classes=num_classes, img_size=img_size)
    return load_weights(model, path, name, role=role).eval()


def fusion_scores(args):
    """{'teacher', 'source', 'fused'}: test top-1 (%) of each, with the images scored and alpha."""
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: the fusion weight lies between 0 and 1")
    dataset = build_dataset(args.dataset or "fashion_mnist", args.data_dir, "val", args)
    teacher = load(args.teacher, args.teacher_checkpoint, "teacher", dataset.num_classes, args.img_size)
    source = load(args.source, args.source_checkpoint, "second source", dataset.num_classes, args.img_size)
    dataset.transform = build_eval_transform(resolve_data_settings(args, teacher, dataset))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, **worker_processes(args.workers))
    correct = {"teacher": 0, "source": 0, "fused": 0}
    seen = 0
    with torch.inference_mode():
        for images, targets in loader:
            z_t, z_c = teacher(images), source(images)
            for key, logits in (("teacher", z_t), ("source", z_c), ("fused", fuse(z_t, z_c, args.alpha))):
                correct[key] += int((logits.argmax(dim=1) == targets).sum())
            seen += len(targets)
    scores = {key: round(100.0 * hits / seen, 2) for key, hits in correct.items()}
    return dict(scores, alpha=args.alpha, images=seen, teacher_model=args.teacher, source_model=args.source,
                teacher_sha256=file_sha256(args.teacher_checkpoint), source_sha256=file_sha256(args.source_checkpoint))


@exit_cleanly_on_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    result = fusion_scores(args)
    if args.json:
        atomic_write_text(json.dumps(result, indent=1), args.json)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
