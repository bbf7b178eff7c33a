#!/usr/bin/env python3
"""Extra trainable parameters of RSD (gamma 2 and 4), OFA and PAT for every paper pair (the paper's Figure 3).

    python tools/overhead.py                         all presets of configs/presets/ (Tables 1 and 2)
    python tools/overhead.py PRESET.yaml ... --json overhead.json

Each pair is read from its preset (student, teacher, class count) and built at 224 px with random weights
(no checkpoint needed): parameter counts do not depend on them. Each model is built once and shared by
the distillers. Prints a markdown table: the student's parameters, each method's extra parameters (AAD,
OFA branches, PAT's prompts, region attention and aligners) and their ratio to the student.
"""
import argparse
import glob
import json
import os

import torch

from distillers import DISTILLERS, build_distiller
from engine.config import parse_args_with_config
from engine.models import count_parameters, create_model
from engine.train_args import build_train_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMG_SIZE = 224
# column -> the flags that select it on top of a preset
METHODS = {"rsd_gamma2": ["--distiller", "rsd", "--rsd-gamma", "2"],
           "rsd_gamma4": ["--distiller", "rsd", "--rsd-gamma", "4"],
           "ofa": ["--distiller", "ofa"],
           "pat": ["--distiller", "pat"]}
HEADERS = {"rsd_gamma2": "RSD (gamma 2)", "rsd_gamma4": "RSD (gamma 4)", "ofa": "OFA", "pat": "PAT"}


def paper_presets():
    return sorted(glob.glob(os.path.join(REPO, "configs", "presets", "*", "*.yaml")))


def preset_args(path, flags=()):
    """train.py's arguments for the preset `path` with `flags` on its command line."""
    return parse_args_with_config(build_train_parser(DISTILLERS), ["-c", path, *flags])


def extra_parameter_count(args, student, teacher):
    """Extra trainable parameters of the distiller `args` asks for, built as train.py builds it at 224 px."""
    return build_distiller(args, student, input_size=(3, IMG_SIZE, IMG_SIZE), teacher=teacher).extra_parameter_count()


class ModelCache:
    """Each (architecture, class count) built once, at 224 px with random weights."""

    def __init__(self):
        self.models = {}

    def __call__(self, name, num_classes):
        if (name, num_classes) not in self.models:
            torch.manual_seed(0)
            self.models[name, num_classes] = create_model(name, num_classes=num_classes, img_size=IMG_SIZE)
        return self.models[name, num_classes]


def overhead_row(path, models):
    """One pair's row: its student's parameters and each method's extra parameters and ratio to them."""
    args = preset_args(path)
    student, teacher = models(args.model, args.num_classes), models(args.teacher, args.num_classes)
    row = {"preset": os.path.relpath(path, REPO), "dataset": args.dataset, "num_classes": args.num_classes,
           "teacher": args.teacher, "student": args.model, "student_params": count_parameters(student)}
    for column, flags in METHODS.items():
        row[column] = extra_parameter_count(preset_args(path, flags), student, teacher)
        row[f"{column}_ratio"] = row[column] / row["student_params"]
    return row


def markdown_table(rows):
    lines = ["| dataset | teacher -> student | student params | "
             + " | ".join(f"{HEADERS[c]} extra | ratio" for c in METHODS) + " |",
             "|---|---|---:|" + "---:|---:|" * len(METHODS)]
    for row in rows:
        cells = [row["dataset"], f"{row['teacher']} -> {row['student']}", f"{row['student_params']:,}"]
        cells += [v for c in METHODS for v in (f"{row[c]:,}", f"{row[c + '_ratio']:.2f}x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="*", help="preset YAML files (default: every one of configs/presets/)")
    p.add_argument("--json", default="", help="also write the rows here")
    opts = p.parse_args(argv)
    models = ModelCache()
    rows = [overhead_row(path, models) for path in opts.presets or paper_presets()]
    print(markdown_table(rows))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
