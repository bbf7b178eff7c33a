"""The fidelity study's CKA maps with their noise floor: one teacher-vs-student map per seed (tools/cka.py), the
mean and spread over seeds, and where a method's map differs from scratch's by more than that spread.

    seed_cka("convnext_demo_32", "pretrained/convnext_demo_32_fmnist.pth",
             {"scratch": [s0, s1, s2], "rsd": [r0, r1, r2]}, seeds=[0, 1, 2], images=500,
             json_path="results/fidelity/cka_deit.json", png_path="results/fidelity/cka_deit.png")

Per cell (teacher layer, student layer): mean and sample std (ddof 1) over the seeds of each method; the floor of a
method is max(its std, scratch's std) and the method differs from scratch only where |mean - scratch's mean|
exceeds it (on the layers both have: RSD's AAD column has no scratch counterpart). Scratch against scratch
(seed i's student as the "teacher" of seed i+1's, cyclically) gives the CKA two students of one architecture reach
by chance of the seed alone: the reference a teacher-student value is read against. RSD's checkpoints keep their
AAD, so its map also has the column "AAD(embedding)": the decoupler's output, the representation RSD's loss pulls
towards the teacher's embedding, beside the raw student embedding.
"""
import json
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from kdcore.io import atomic_write, atomic_write_text
from tools import cka

REFERENCE = "scratch"


def one_map(teacher_model, teacher_checkpoint, checkpoints, labels, images, json_path):
    """tools/cka.py's result for `checkpoints` (students, one panel each) against one teacher."""
    args = cka.build_parser().parse_args(
        ["--teacher", teacher_model, "--teacher-checkpoint", teacher_checkpoint, "--student-checkpoint",
         *checkpoints, "--labels", *labels, "--images", str(images), "--workers", "0",
         "--output", json_path + ".png", "--json", json_path])
    return cka.compute(args)


def spread(maps):
    """Mean and sample std (ddof 1; None for one seed) over seeds of equally shaped maps."""
    stack = np.array(maps, dtype=np.float64)
    return stack.mean(0), (stack.std(0, ddof=1) if len(stack) > 1 else None)


def method_summary(method, maps, reference):
    """Mean, std, floor and the cells where `method` differs from scratch beyond the floor."""
    mean, std = spread(maps)
    entry = {"mean": mean.tolist(), "std": None if std is None else std.tolist()}
    if method != REFERENCE and reference is not None:
        ref_mean, ref_std = reference
        if std is not None and ref_std is not None:
            shared = ref_mean.shape[1]  # scratch's layers; RSD's extra AAD column comes last and has no reference
            floor = np.maximum(std[:, :shared], ref_std)
            differs = np.abs(mean[:, :shared] - ref_mean) > floor
            entry.update(floor=floor.tolist(), differs=differs.tolist(), differs_count=int(differs.sum()))
    return entry


def aad_rows(seed_results, teacher_layers):
    """Per method with an AAD column: CKA of the teacher's embedding with the raw student embedding and with the
    AAD's output, one value per seed."""
    row = teacher_layers.index("embedding")
    found = {}
    for result in seed_results:
        for student in result["students"]:
            if cka.AAD_LAYER in student["layers"]:
                entry = found.setdefault(student["label"], {"raw_embedding": [], "aad_output": []})
                entry["raw_embedding"].append(student["cka"][row][student["layers"].index("embedding")])
                entry["aad_output"].append(student["cka"][row][student["layers"].index(cka.AAD_LAYER)])
    return found


def scratch_pairs(student_model, students, seeds, images, json_path):
    """Scratch seed i's student against seed i+1's (cyclically; one pair for two seeds, none for one)."""
    paths = students.get(REFERENCE, [])
    if len(paths) < 2:
        return []
    pairs = [(i, (i + 1) % len(paths)) for i in range(len(paths) if len(paths) > 2 else 1)]
    out = []
    for i, j in pairs:
        result = one_map(student_model, paths[i], [paths[j]], [f"scratch seed {seeds[j]}"], images,
                         json_path)
        out.append({"seeds": [seeds[i], seeds[j]], "layers": result["students"][0]["layers"],
                    "cka": result["students"][0]["cka"]})
    return out


def seed_cka(teacher_model, teacher_checkpoint, students, seeds, images, json_path, png_path):
    """Write `json_path` (per-seed maps, per-method mean/std/floor/differs, scratch vs scratch, the AAD block, a
    "summary") and `png_path` (mean maps, cells beyond the floor framed); return the JSON's dict."""
    methods = list(students)
    if any(len(students[m]) != len(seeds) for m in methods):
        raise ValueError(f"one checkpoint per seed {seeds} for every method, got "
                         f"{ {m: len(p) for m, p in students.items()} }")
    per_seed = []
    for i, seed in enumerate(seeds):
        print(f"CKA maps, seed {seed}: the teacher against {', '.join(methods)}", flush=True)
        per_seed.append(one_map(teacher_model, teacher_checkpoint, [students[m][i] for m in methods], methods,
                                images, json_path))
    maps = {m: [r["students"][k]["cka"] for r in per_seed] for k, m in enumerate(methods)}
    layers = {s["label"]: s["layers"] for s in per_seed[0]["students"]}
    reference = spread(maps[REFERENCE]) if REFERENCE in maps else None
    summaries = {m: method_summary(m, maps[m], reference) for m in methods}
    student_model = per_seed[0]["students"][0]["model"]
    scratch = scratch_pairs(student_model, students, seeds, images, json_path)
    teacher_layers = per_seed[0]["teacher_layers"]
    result = {
        "teacher": teacher_model, "teacher_checkpoint": per_seed[0]["teacher_checkpoint"],
        "teacher_sha256": per_seed[0]["teacher_sha256"], "student": student_model,
        "teacher_layers": teacher_layers, "student_layers": layers, "estimator": per_seed[0]["estimator"],
        "seeds": {str(seed): [{"label": s["label"], "checkpoint": s["checkpoint"], "sha256": s["sha256"],
                               "cka": s["cka"]} for s in r["students"]] for seed, r in zip(seeds, per_seed)},
        "methods": summaries, "scratch_vs_scratch": scratch,
        "summary": {
            "seeds": list(seeds), "images": per_seed[0]["images"],
            "cells": int(np.size(maps.get(REFERENCE, maps[methods[0]])[0])),
            "differs_count": {m: s["differs_count"] for m, s in summaries.items() if "differs_count" in s},
            "aad": aad_rows(per_seed, teacher_layers)}}
    if scratch:
        result["summary"]["scratch_vs_scratch_diagonal_mean"] = float(np.mean(
            [np.diagonal(np.array(p["cka"])).mean() for p in scratch]))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    atomic_write_text(json.dumps(result, indent=1), json_path)
    plot_floor_maps(result, png_path)
    return result


def plot_floor_maps(result, path):
    """One panel per method (mean over seeds, "mean ± std" per cell, cells beyond the floor framed), then
    scratch against scratch; one colour scale (0 to 1)."""
    methods = list(result["methods"])
    panels = [(m, result["methods"][m], result["student_layers"][m], result["teacher_layers"],
               f"teacher layer ({result['teacher']})") for m in methods]
    if result["scratch_vs_scratch"]:
        pair = result["scratch_vs_scratch"][0]
        panels.append((f"scratch seed {pair['seeds'][0]} vs {pair['seeds'][1]}", {"mean": pair["cka"]},
                       pair["layers"], pair["layers"], f"student layer ({result['student']})"))
    widths = [len(p[2]) for p in panels]
    height = max(len(p[3]) for p in panels)
    fig = Figure(figsize=(1.5 + 0.8 * sum(widths) + 1.2 * len(panels), 2.0 + 0.55 * height))
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    image = None
    for ax, (title, entry, cols, rows, ylabel) in zip(axes, panels):
        mean = np.array(entry["mean"])
        image = ax.imshow(mean, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
        std, differs = entry.get("std"), entry.get("differs")
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                text = f"{mean[i, j]:.2f}" + (f"\n±{std[i][j]:.2f}" if std is not None else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=6,
                        color="white" if mean[i, j] < 0.6 else "black")
                if differs is not None and j < len(differs[i]) and differs[i][j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5))
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel(f"student layer ({result['student']})", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        suffix = f"\n{entry['differs_count']} cells beyond the floor" if "differs_count" in entry else ""
        ax.set_title(title + suffix, fontsize=9)
    fig.colorbar(image, ax=list(axes), fraction=0.03, label="linear CKA")
    seeds = result["summary"]["seeds"]
    fig.suptitle(f"linear CKA, mean ± std over seeds {seeds} ({result['summary']['images']} validation images); "
                 f"framed: differs from scratch beyond max(std, scratch's std)", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))

