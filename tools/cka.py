#!/usr/bin/env python3
"""Feature similarity of a teacher and its students (the paper's Figure 4): a linear-CKA heatmap PNG.

    python tools/cka.py --teacher convnext_demo_32 --teacher-checkpoint pretrained/convnext_demo_32_fmnist.pth \
        --student-checkpoint RUN/last.pth.tar --output cka.png
    # several students of one teacher, side by side in one PNG (one panel each, one colour scale):
    python tools/cka.py --teacher ... --teacher-checkpoint ... \
        --student-checkpoint A/last.pth.tar B/last.pth.tar --labels scratch rsd --output cka.png --json cka.json

Rows are the teacher's layers, columns the student's; each cell is minibatch linear CKA (tools/cka_metric.py:
unbiased HSIC averaged over minibatches, features flattened per image) over `--images` validation images, a
fixed class-balanced choice. `--layers blocks` (default) takes every output of timm's forward_intermediates()
(each block of a ViT or Mixer; each stage of a ConvNeXt, which timm reports per stage), `--layers stages` the
paper's stages 1-4 from the stage table; the pooled embedding and the logits follow as the last two layers. An RSD
run's checkpoint also keeps its AAD (the decoupler trained beside the student, discarded for inference): its output
on the student's embedding follows as the column "AAD(embedding)", the representation RSD's loss compared with the
teacher's embedding.
Every model sees the same batches, normalised as the student's checkpoint records (the study's teacher and
students share their input statistics). The data and the student's architecture default to those its
training checkpoint records; plain state dicts need --student and, for data other than Fashion-MNIST,
--dataset.
"""
import argparse
import json
import os

import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from custom_forward import family_for, stage_features
from distillers.rsd import ArchitectureAgnosticDecoupler
from engine.datasets import ClassBalancedSubset, build_dataset
from engine.loader import build_eval_transform, resolve_data_settings, worker_processes
from engine.models import create_model
from engine.plugins import add_import_argument, import_modules_of_command_line
from engine.train_args import add_data_arguments
from engine.weights import load_weights, read_checkpoint, recorded_args
from kdcore.errors import UserError, exit_cleanly_on_error
from kdcore.features import PAPER_STAGES
from kdcore.io import atomic_write, atomic_write_text, file_sha256
from tools.cka_metric import MinibatchCKA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECORDED_DATA_KEYS = ("data_dir", "dataset", "num_classes", "img_size", "mean", "std", "crop_pct", "interpolation",
                      "synthetic_train_size", "synthetic_val_size", "synthetic_seed")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    add_import_argument(p)
    p.set_defaults(batch_size=100, workers=1)
    p.add_argument("--teacher", required=True, help="timm model name of the teacher")
    p.add_argument("--teacher-checkpoint", required=True, help="the teacher's weights")
    p.add_argument("--student", nargs="+", default=[],
                   help="student model name(s): one for all checkpoints or one each (default: as recorded)")
    p.add_argument("--student-checkpoint", nargs="+", required=True,
                   help="a run's last/best.pth.tar or a student export; several give panels side by side")
    p.add_argument("--labels", nargs="+", default=[], help="panel titles, one per student checkpoint")
    p.add_argument("--num-classes", type=int, default=None, help="default: as recorded, else the dataset's")
    p.add_argument("--images", type=int, default=500, help="validation images (class-balanced, fixed)")
    p.add_argument("--layers", default="blocks", choices=("blocks", "stages"))
    p.add_argument("--estimator", default="unbiased", choices=("unbiased", "biased"),
                   help="HSIC estimator; biased with one minibatch is the classic full-batch linear CKA")
    p.add_argument("--output", required=True, help="heatmap PNG")
    p.add_argument("--json", default="", help="also write the CKA matrices here")
    return p


def fill_data_args(args, recorded):
    """Data settings the student's training run recorded, where not given on the command line."""
    for key in RECORDED_DATA_KEYS:
        if getattr(args, key) in (None, "") and recorded.get(key) not in (None, ""):
            setattr(args, key, recorded[key])
    args.dataset = args.dataset or "fashion_mnist"


AAD_LAYER = "AAD(embedding)"


def trained_decoupler(checkpoint):
    """The AAD an RSD run's checkpoint keeps beside its student (`distiller_extra`, eval mode), else None."""
    extra = checkpoint.get("distiller_extra") if isinstance(checkpoint, dict) else None
    if not isinstance(extra, dict) or "aad.0.weight" not in extra:
        return None
    state = {k[len("aad."):]: v for k, v in extra.items() if k.startswith("aad.")}
    hidden, in_dim = state["0.weight"].shape
    aad = ArchitectureAgnosticDecoupler(in_dim, state["3.weight"].shape[0], gamma=hidden / in_dim)
    aad.load_state_dict(state, strict=True)
    return aad.eval()


def load_students(args, checkpoints, num_classes):
    """[(label, model name, model, AAD or None)] of the student checkpoints (already read: `checkpoints`)."""
    paths = args.student_checkpoint
    if len(args.student) not in (0, 1, len(paths)):
        raise UserError(f"--student takes one model name for all {len(paths)} checkpoints or one each, "
                        f"got {len(args.student)}")
    if args.labels and len(args.labels) != len(paths):
        raise UserError(f"--labels takes one title per student checkpoint ({len(paths)}), got {len(args.labels)}")
    names = args.student * len(paths) if len(args.student) == 1 else args.student or [None] * len(paths)
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in paths]
    students = []
    for path, name, label, checkpoint in zip(paths, names, labels, checkpoints):
        recorded = recorded_args(checkpoint)
        name = name or recorded.get("model")
        if not name:
            raise UserError(f"{path!r} does not record its architecture; pass --student NAME")
        model = create_model(name, num_classes=recorded.get("num_classes") or num_classes, img_size=args.img_size)
        load_weights(model, path, name, role="student", checkpoint=checkpoint)
        students.append((label, name, model.eval(), trained_decoupler(checkpoint)))
    return students


def layer_outputs(model, x, layers, aad=None):
    """[(layer name, features)] of one batch: the model's blocks or paper stages, its embedding, its logits, and
    the AAD's output on the embedding when `aad` is given."""
    if layers == "stages":
        final, stages = stage_features(model, x, PAPER_STAGES)
        named = [(f"stage {s}", t) for s, t in stages.items()]
    else:
        info = getattr(model, "feature_info", None)
        if not isinstance(info, list) or not info:
            raise UserError(f"{type(model).__name__} lists no intermediate outputs (feature_info); use --layers stages")
        final, outs = family_for(model).run(model, x, list(range(len(info))))
        named = [(entry["module"], t) for entry, t in zip(info, outs)]
    embedding = model.forward_head(final, pre_logits=True)
    named += [("embedding", embedding), ("logits", model.forward_head(final))]
    return named + [(AAD_LAYER, aad(embedding))] if aad is not None else named


def validation_batches(args, dataset, model):
    """Minibatches of `args.images` class-balanced validation images, transformed for `model`."""
    if not 4 <= args.images <= len(dataset):
        raise UserError(f"--images {args.images} must lie between 4 and the validation set's {len(dataset)} images")
    batch_size = min(args.batch_size, args.images)
    if batch_size < 4:
        raise UserError(f"--batch-size {args.batch_size}: minibatch CKA needs at least 4 images per minibatch")
    subset = ClassBalancedSubset(dataset, args.images)
    subset.transform = build_eval_transform(resolve_data_settings(args, model, dataset))
    # drop_last: every minibatch holds batch_size images, so each HSIC estimate has the same weight
    return DataLoader(subset, batch_size=batch_size, shuffle=False, drop_last=True,
                      **worker_processes(args.workers))


def portable_path(path, folder):
    """`path` as the results record it, never absolute: relative to the repo when inside it, else relative to
    `folder` (where the JSON is written, e.g. the study's output folder holding the runs)."""
    path = os.path.abspath(path)
    if os.path.commonpath([path, REPO]) == REPO:
        return os.path.relpath(path, REPO)
    return os.path.relpath(path, os.path.abspath(folder))


def compute(args):
    """The CKA matrices of every student against the teacher, with their layer names (a JSON-ready dict)."""
    checkpoints = [read_checkpoint(path) for path in args.student_checkpoint]
    fill_data_args(args, recorded_args(checkpoints[0]))
    dataset = build_dataset(args.dataset, args.data_dir, "val", args)
    num_classes = args.num_classes or dataset.num_classes
    students = load_students(args, checkpoints, num_classes)
    teacher = create_model(args.teacher, num_classes=num_classes, img_size=args.img_size)
    load_weights(teacher, args.teacher_checkpoint, args.teacher, role="teacher")
    teacher.eval()
    accumulators = [MinibatchCKA(unbiased=args.estimator == "unbiased") for _ in students]
    seen = 0
    with torch.inference_mode():
        for images, _ in validation_batches(args, dataset, students[0][2]):
            teacher_named = layer_outputs(teacher, images, args.layers)
            student_named = [layer_outputs(model, images, args.layers, aad) for _, _, model, aad in students]
            for accumulator, named in zip(accumulators, student_named):
                accumulator.update([t for _, t in teacher_named], [t for _, t in named])
            seen += len(images)
    folder = os.path.dirname(os.path.abspath(args.json or args.output))
    return {
        "teacher": args.teacher, "teacher_checkpoint": portable_path(args.teacher_checkpoint, folder),
        "teacher_sha256": file_sha256(args.teacher_checkpoint),
        "teacher_layers": [name for name, _ in teacher_named], "images": seen,
        "minibatches": accumulators[0].batches, "estimator": args.estimator, "layers": args.layers,
        "students": [{"label": label, "model": name, "checkpoint": portable_path(path, folder),
                      "sha256": file_sha256(path), "layers": [n for n, _ in named],
                      "cka": accumulator.value().tolist()}
                     for (label, name, _, _), path, named, accumulator in zip(students, args.student_checkpoint,
                                                                           student_named, accumulators)]}


def plot_heatmaps(result, path):
    """One panel per student, teacher layers down, student layers across, one colour scale (0 to 1)."""
    students, rows = result["students"], result["teacher_layers"]
    widths = [len(s["layers"]) for s in students]
    fig = Figure(figsize=(1.2 + 0.55 * sum(widths) + 0.8 * len(students), 1.6 + 0.5 * len(rows)))
    axes = fig.subplots(1, len(students), squeeze=False, gridspec_kw={"width_ratios": widths})
    for ax, student in zip(axes[0], students):
        image = ax.imshow(student["cka"], vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
        for i, row in enumerate(student["cka"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(student["layers"])), student["layers"], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.set_title(student["label"], fontsize=9)
        ax.set_xlabel(f"student layer ({student['model']})", fontsize=8)
    axes[0][0].set_ylabel(f"teacher layer ({result['teacher']})")
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03, label="linear CKA")
    fig.suptitle(f"linear CKA ({result['estimator']} minibatch HSIC, {result['images']} validation images)",
                 fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130, bbox_inches="tight"))


@exit_cleanly_on_error
def main(argv=None):
    import_modules_of_command_line(argv)  # before the parser: their datasets are valid --dataset choices
    args = build_parser().parse_args(argv)
    result = compute(args)
    plot_heatmaps(result, args.output)
    if args.json:
        atomic_write_text(json.dumps(result, indent=1), args.json)
    print(f"CKA over {result['images']} images ({result['minibatches']} minibatches): {args.output}", flush=True)
    return result


if __name__ == "__main__":
    main()
