"""The fidelity study's report: table.md (protocol, cells, paired differences, the pilot and the tuning; the
controls, RichKD isolated, PAT and the CKA maps' summary) and top1.png (our gains over scratch beside the
paper's), from the study's result rows and its fusion.json and cka_*.json."""
from __future__ import annotations

import glob
import itertools
import json
import math
import os
import statistics

from matplotlib.figure import Figure

from kdcore.io import atomic_write, atomic_write_text
from tools.study_runs import METHODS, RANDOM
from tools.study_stats import cell, comparisons, paired_difference

# The paper's CIFAR-100 Table 1 rows that our pairs stand for, by our student.
PAPER_ROWS = {
    "deit_demo_32": ("ConvNeXt-T -> DeiT-T",
                     {"scratch": 68.00, "kd": 72.99, "dkd": 74.60, "ofa": 75.76, "rsd": 82.46}),
    "mixer_demo_32": ("ConvNeXt-T -> ResMLP-S12",
                      {"scratch": 66.56, "kd": 72.25, "dkd": 73.22, "ofa": 81.22, "rsd": 84.21}),
    "resnet_demo_32": ("Swin-T -> ResNet18",
                       {"scratch": 74.01, "kd": 78.74, "dkd": 80.26, "ofa": 80.54, "rsd": 83.92}),
}
OUR_NAMES = {"deit_demo_32": "ConvNeXt -> DeiT", "mixer_demo_32": "ConvNeXt -> Mixer",
             "resnet_demo_32": "Swin -> ResNet"}
FUSION = "fusion.json"  # RichKD's logits alone on the test set (tools/study_fusion.py)
KD_AT_RICHKD = "kd at RichKD's T and weight"
# The arms' tables: title, the role whose runs make the table (the grid's runs of the same seeds and student are
# its references), the comparisons (a - b by seed; Holm within the table)
SECTIONS = (
    ("Controls", "controls", (("rsd", "rsd, random teacher"), ("kd", "kd, random teacher"),
                              ("rsd, random teacher", "scratch"), ("kd, random teacher", "scratch"),
                              ("rsd", "rsd, kappa 0"))),
    ("RichKD isolated", "richkd", (("richkd (L)", KD_AT_RICHKD), ("richkd (L)", "scratch"), ("richkd (F)", "scratch"),
                                   ("richkd (LF)", "richkd (L)"), (KD_AT_RICHKD, "kd"))),
    ("PAT", "pat", (("pat", "scratch"), ("rsd", "pat"), ("pat", "ofa"))),
)
METRICS = (("test_top1_last", "Test top-1 (%) at the last epoch"),
           ("test_top1_selected", "Test top-1 (%) of the checkpoint selected on the validation split"),
           ("val_top1_last", "Validation top-1 (%) at the last epoch"))


def grid_rows(rows):
    return [r for r in rows if "grid" in r["roles"].split()]


def arm_label(row):
    """A run's name in the arms' tables: its method, or what sets it apart (a random teacher, kappa 0, ...)."""
    if row["pair"].split("-", 1)[0].endswith(RANDOM):
        return f"{row['method']}, random teacher"
    setting = dict(item.split("=", 1) for item in row["hyperparameters"].split(",") if "=" in item)
    if row["method"] == "rsd" and float(setting.get("rsd_kappa", "nan")) == 0.0:
        return "rsd, kappa 0"
    if row["method"] == "richkd":
        return f"richkd ({setting['richkd_mode']})"
    if row["method"] == "kd" and "kd_loss_weight" in setting:
        return KD_AT_RICHKD
    return row["method"]


def arm_rows(rows, role):
    """{student: rows} of the runs of `role` with, as references, the grid's runs of the same student and seeds."""
    found = {}
    for r in rows:
        if role in r["roles"].split():
            found.setdefault(student_of(r["pair"]), []).append(r)
    for student, own in found.items():
        seeds = {r["seed"] for r in own}
        own += [r for r in grid_rows(rows) if student_of(r["pair"]) == student and r["seed"] in seeds
                and role not in r["roles"].split()]
    return found


def arm_by_seed(rows, column):
    found = {}
    for r in rows:
        found.setdefault(arm_label(r), {})[int(r["seed"])] = float(r[column])
    return found


def student_of(pair):
    return pair.split("-", 1)[1]


def by_seed(rows, pair, column):
    """{method: {seed: value}} of one pair's grid rows."""
    found = {}
    for r in rows:
        if r["pair"] == pair:
            found.setdefault(r["method"], {})[int(r["seed"])] = float(r[column])
    return found


def ordered(rows):
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    return methods, list(dict.fromkeys(r["pair"] for r in rows))


def format_cell(values):
    if not values:
        return "-"
    mean, std, n = cell(values)
    return f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n=1)"


def format_p(p):
    return "-" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def difference_line(name, c):
    interval = "-" if math.isnan(c["low"]) else f"[{c['low']:.2f}, {c['high']:.2f}]"
    return (f"| {name} | {c['a']} - {c['b']} | {c['mean']:+.2f} | {interval} | {format_p(c['p'])} | "
            f"{format_p(c['p_holm'])} | {c['n']} |")


DIFFERENCE_HEADER = ["| pair | difference | mean | 95% interval | p | p (Holm) | n |", "|---|---|---|---|---|---|---|"]


def comparison_lines(rows, pairs, column):
    lines = list(DIFFERENCE_HEADER)
    for pair in pairs:
        lines += [difference_line(OUR_NAMES.get(student_of(pair), pair), c)
                  for c in comparisons(by_seed(rows, pair, column))]
    return lines


def section_lines(rows, fusion):
    """The arms' tables (SECTIONS), each on its students: cells, then paired differences with Holm."""
    lines = []
    for title, role, wanted in SECTIONS:
        for student, found in arm_rows(rows, role).items():
            name = OUR_NAMES.get(student, student)
            seeds = sorted({int(r["seed"]) for r in found})
            arms = arm_by_seed(found, "test_top1_last")
            order = [a for a in dict.fromkeys([x for pair in wanted for x in pair] + list(arms)) if a in arms]
            lines += [f"{title} on {name}: test top-1 (%) at the last epoch, seeds {seeds} (the grid's runs of "
                      f"these seeds are the references):", "", "| arm | test top-1 |", "|---|---|"]
            lines += [f"| {a} | {format_cell(list(arms[a].values()))} |" for a in order]
            lines += [""] + DIFFERENCE_HEADER + [difference_line(name, c) for c in comparisons(arms, wanted)] + [""]
            if role == "richkd" and fusion:
                lines += [f"The logits alone on the {fusion['images']} test images: teacher {fusion['teacher']:.2f}, "
                          f"second source ({fusion['source_model']}, trained here) {fusion['source']:.2f}, fused "
                          f"(alpha {fusion['alpha']}) {fusion['fused']:.2f}.", ""]
    return lines


def cka_lines(summaries):
    """Per CKA JSON (tools/study_cka.py): the cells where a method differs from scratch beyond the seed-to-seed
    std, the scratch-vs-scratch reference and the AAD's output against the teacher's embedding."""
    lines = []
    for pair, summary in summaries.items():
        seeds = len(summary["seeds"])
        head = (f"CKA on {OUR_NAMES.get(student_of(pair), pair)} ({seeds} seed{'s' if seeds > 1 else ''}, "
                f"{summary['images']} test images): ")
        if summary["differs_count"]:
            head += (f"cells differing from scratch beyond the floor (the larger std over seeds of the two), of "
                     f"{summary['cells']}: " + ", ".join(f"{m} {n}" for m, n in summary["differs_count"].items()))
        else:
            head += "no noise floor from a single seed, so no cell is said to differ from scratch"
        lines += [head + ".", ""]
        reference = summary.get("scratch_vs_scratch_diagonal_mean")
        if reference is not None:
            lines += [f"Scratch against scratch (other seeds), mean of the same-layer cells: {reference:.3f}.", ""]
        for method, aad in summary.get("aad", {}).items():
            lines += [f"{method}: teacher embedding against the student's raw embedding "
                      f"{cell_text(aad['raw_embedding'])}, against the AAD's output {cell_text(aad['aad_output'])}.",
                      ""]
    return lines


def cell_text(values):
    mean, std, n = cell(values)
    return f"{mean:.3f} ± {std:.3f} (n={n})" if n > 1 else f"{mean:.3f} (n=1)"


def cost_lines(rows):
    """The median wall time per run at the grid's schedule, by student, method and CPU, and the ratio between
    two CPUs where both ran the same student and method: the measured scale of one CPU's run time to another's."""
    grid = grid_rows(rows)
    if not grid:
        return []
    schedule = (grid[0]["train_subset"], grid[0]["epochs"])
    walls = {}
    for r in rows:
        if (r["train_subset"], r["epochs"]) == schedule and r["cpu"]:
            walls.setdefault((student_of(r["pair"]), r["method"]), {}).setdefault(r["cpu"], []).append(
                float(r["wall_s"]))
    medians = {kind: {cpu: statistics.median(v) for cpu, v in by_cpu.items()} for kind, by_cpu in walls.items()}
    lines = [f"Wall time per run at {schedule[1]} epochs on {schedule[0]} images (median seconds; two runs share "
             "the machine, one thread each):", "", "| student | method | CPU | runs | median s |",
             "|---|---|---|---|---|"]
    for (student, method), by_cpu in sorted(medians.items()):
        lines += [f"| {student} | {method} | {cpu} | {len(walls[student, method][cpu])} | {m:.0f} |"
                  for cpu, m in sorted(by_cpu.items(), key=lambda item: item[1])]
    ratios = [(student, method, fast, slow, by_cpu[slow] / by_cpu[fast])
              for (student, method), by_cpu in sorted(medians.items())
              for fast, slow in itertools.combinations(sorted(by_cpu, key=by_cpu.get), 2)]
    if ratios:
        lines += ["", "The same student and method on two CPUs: the slower's median over the faster's:", "",
                  "| student | method | faster CPU | slower CPU | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {m} | {fast} | {slow} | {ratio:.2f} |" for s, m, fast, slow, ratio in ratios]
    return lines + [""]


def protocol_lines(rows, pilot, tuning):
    grid = grid_rows(rows)
    lines = []
    if grid:
        first = grid[0]
        cpus = sorted({r["cpu"] for r in rows if r["cpu"]})
        dates = sorted({r["date"] for r in rows if r["date"]})
        lines += [f"Training subset {first['train_subset']} images, validation split {first['holdout']} held-out "
                  f"training images, {first['epochs']} epochs ({first['steps']} optimizer steps); "
                  f"CPU: {'; '.join(cpus)}; dates {dates[0]} to {dates[-1]}.", ""]
    if pilot and pilot.get("levels"):
        lines += ["Pilot (" + pilot["rule"] + "):", "", "| subset | E | 2E | steps at E | gain of 2E | plateau |",
                  "|---|---|---|---|---|---|"]
        for level in pilot["levels"]:
            gains = ", ".join(f"{OUR_NAMES.get(student_of(p), p)} {g:+.2f}" for p, g in level["gain"].items())
            lines.append(f"| {level['train_subset']} | {level['epochs']} | {level['check_epochs']} | "
                         f"{level['steps']} | {gains} | {'yes' if level['plateau'] else 'no'} |")
        lines += ["", f"Choice: {pilot['choice']}." if pilot.get("choice") else "Choice: pending.", ""]
    if tuning and tuning.get("methods"):
        lines += [f"Tuning on {tuning['pair']}, seeds {tuning['seeds']} ({tuning['metric']}):", "",
                  "| method | flag | default | alternative | val default | val alternative | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for m, t in tuning["methods"].items():
            lines.append(f"| {m} | `{t['flag']}` | {t['default']} | {t['alternative']} | "
                         f"{t['val_top1']['default']:.2f} | {t['val_top1']['alternative']:.2f} | {t['chosen']} |")
        lines.append("")
    return lines


def write_table(rows, pilot, tuning, path, fusion=None, cka=None):
    grid = grid_rows(rows)
    methods, pairs = ordered(grid)
    lines = ["# Fidelity study", "", "Generated by tools/fidelity_study.py from results.csv; mean ± sample std over "
             "seeds (n seeds).", ""] + protocol_lines(rows, pilot, tuning)
    for column, title in METRICS:
        if not grid:
            break
        names = [OUR_NAMES.get(student_of(p), p) for p in pairs]
        lines += [f"{title}:", "", "| method | " + " | ".join(names) + " |", "|---" * (len(pairs) + 1) + "|"]
        for m in methods:
            cells = [format_cell(list(by_seed(grid, p, column).get(m, {}).values())) for p in pairs]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if grid:
        lines += ["Paired differences by seed of the last-epoch test top-1 (95% t-interval, two-sided paired "
                  "t-test; Holm over the comparisons of a pair):", ""] + comparison_lines(grid, pairs,
                                                                                      "test_top1_last") + [""]
    lines += section_lines(rows, fusion) + cka_lines(cka or {}) + cost_lines(rows)
    atomic_write_text("\n".join(lines), path)


def gain_points(ax, by, names, paper=None):
    """Each of `names`' paired gain over by["scratch"] (mean, 95% interval) at x = 0, 1, ..., and the paper's."""
    for x, name in enumerate(names):
        if name in by and "scratch" in by:
            c = paired_difference(by[name], by["scratch"])
            err = 0 if math.isnan(c["low"]) else [[c["mean"] - c["low"]], [c["high"] - c["mean"]]]
            ax.errorbar(x - 0.12, c["mean"], yerr=err, fmt="o", color="C0", capsize=4,
                        label="ours (95% interval)" if x == 0 else None)
        if paper and name in paper:
            ax.plot(x + 0.12, paper[name] - paper["scratch"], "s", color="C1", fillstyle="none", markersize=7,
                    label="paper, CIFAR-100" if x == 0 else None)
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6
                  else "center", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_gains(rows, path):
    """top1.png: per pair, each method's gain over scratch (paired by seed, 95% interval) beside the paper's
    (PAT on its seeds), then one panel per arms' table (the controls, RichKD) on its student."""
    grid = grid_rows(rows)
    methods, pairs = ordered(grid)
    methods = [m for m in methods if m != "scratch"]
    pat = [r for r in rows if "pat" in r["roles"].split()]
    arms = {title: found for title, role, _ in SECTIONS[:2] for found in arm_rows(rows, role).values()}
    if not pairs or not methods:
        return
    panels = len(pairs) + len(arms)
    fig = Figure(figsize=(1.5 + 3.4 * panels, 4.4))
    axes = fig.subplots(1, panels, squeeze=False, sharey=True)[0]
    for ax, pair in zip(axes, pairs):
        student = student_of(pair)
        by = by_seed(grid, pair, "test_top1_last")
        by.update({k: v for k, v in by_seed([r for r in pat if r["pair"] == pair], pair, "test_top1_last").items()})
        paper_name, paper = PAPER_ROWS.get(student, ("", {}))
        gain_points(ax, by, methods + (["pat"] if "pat" in by else []), paper)
        ax.set_title(f"{OUR_NAMES.get(student, pair)}\n(paper: {paper_name})", fontsize=9)
    for ax, (title, found) in zip(axes[len(pairs):], arms.items()):
        by = arm_by_seed(found, "test_top1_last")
        gain_points(ax, by, [a for a in by if a != "scratch"])
        ax.set_title(f"{title}, {OUR_NAMES.get(student_of(found[0]['pair']), '')}\n(seeds "
                     f"{sorted({int(r['seed']) for r in found})})", fontsize=9)
    axes[0].set_ylabel("gain over scratch, test top-1 (points)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))


def read_records(out):
    """(fusion.json's scores or None, {pair: the summary of its cka_<pair>.json}) of a study folder."""
    fusion = None
    if os.path.isfile(os.path.join(out, FUSION)):
        with open(os.path.join(out, FUSION)) as f:
            fusion = json.load(f)
    cka = {}
    for path in sorted(glob.glob(os.path.join(out, "cka_*.json"))):
        with open(path) as f:
            record = json.load(f)
        if "summary" in record:  # the seeds' maps (tools/study_cka.py), not a single map of tools/cka.py
            cka[os.path.basename(path)[len("cka_"):-len(".json")]] = record["summary"]
    return fusion, cka


def write_report(rows, pilot, tuning, out):
    fusion, cka = read_records(out)
    write_table(rows, pilot, tuning, os.path.join(out, "table.md"), fusion, cka)
    plot_gains(rows, os.path.join(out, "top1.png"))
