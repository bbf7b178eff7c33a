"""tools/fidelity_study.py: its tiny grid end to end, seeds, skipping and resuming, aggregation; the Mixer student."""
import csv
import datetime
import re
import resource

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import run_cli

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.datasets.synthetic import make_synthetic
from engine.run import build_run
from engine.train_args import build_train_parser
from kdcore.features import FeatureRequest, extract_features
from tools import fidelity_study as study

TINY_BUDGET_S = 120  # the limit for the tiny mode in the test suite
DEIT, MIXER = "convnext_demo_32-deit_demo_32", "convnext_demo_32-mixer_demo_32"


def test_mixer_demo_parameter_count_by_hand_and_stages():
    """MLP-Mixer: 4 px patch stem + depth x (LN, token MLP over 64 tokens, LN, channel MLP) + LN + head."""
    d, tokens, depth, classes = 96, 64, 6, 10
    token_hidden, channel_hidden = d // 2, 4 * d  # timm's mlp_ratio (0.5, 4.0)
    block = 2 * d + (tokens * token_hidden + token_hidden + token_hidden * tokens + tokens) + 2 * d + (
        d * channel_hidden + channel_hidden + channel_hidden * d + d)
    expected = (3 * 16 * d + d) + depth * block + 2 * d + (d * classes + classes)
    model = timm.create_model("mixer_demo_32").eval()
    assert sum(p.numel() for p in model.parameters()) == expected
    feats = extract_features(model, torch.randn(2, 3, 32, 32), FeatureRequest(stages=(1, 2, 3, 4), embedding=True))
    assert feats.logits.shape == (2, classes) and feats.embedding.shape == (2, d)
    assert [tuple(feats.stages[s].shape[1:]) for s in (1, 2, 3, 4)] == [(tokens, d)] * 4


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, random_demo_teacher):
    """The tiny grid, with the CPU seconds it took: the study and every train.py under it (OMP_NUM_THREADS=1,
    one process at a time), i.e. its wall time on a machine of its own, whatever else shares this one.
    ~21 s on the Xeon, ~60 s expected on the AVX2-only EPYC: the tool runs each of its grid's runs as its own
    train.py process (what makes a killed study resumable), so it pays their imports; the tests of this
    module share this one study."""
    out = tmp_path_factory.mktemp("study")
    before = children_cpu_seconds()
    result = run_cli("tools/fidelity_study.py", "--tiny", "--out", out, "--teacher-checkpoint", random_demo_teacher)
    return out, result, children_cpu_seconds() - before


def run_weights(out, pair, method, seed=0):
    return torch.load(out / pair / method / f"seed{seed}" / "student_last.pth", weights_only=True)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_mode_runs_end_to_end_within_budget(tiny_study):
    out, result, cpu_seconds = tiny_study
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert cpu_seconds < TINY_BUDGET_S, f"the tiny study took {cpu_seconds:.0f} CPU seconds"
    assert re.search(r"\[4/4\] \S+ rsd seed 0: done in \S+; 0 run\(s\) left, ETA 0:00:00", result.stdout)
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == ["method", "pair", "seed", "best_top1", "last_top1", "wall_s", "cpu", "date"]
    assert sorted((r["pair"], r["method"], r["seed"]) for r in rows) == [
        (DEIT, "rsd", "0"), (DEIT, "scratch", "0"), (MIXER, "rsd", "0"), (MIXER, "scratch", "0")]
    for row in rows:
        folder = out / row["pair"] / row["method"] / "seed0"
        top1 = [float(r["eval_top1"]) for r in read_csv(folder / "summary.csv")]
        assert (float(row["best_top1"]), float(row["last_top1"])) == (max(top1), top1[-1])
        assert float(row["wall_s"]) > 0 and row["cpu"]
        assert row["date"] == datetime.date.today().isoformat()
        assert "teacher_precision: fp32" in (folder / "args.yaml").read_text()  # pinned by the config
    table = (out / "table.md").read_text()
    assert re.search(r"\| scratch \| [\d.]+ \(n=1\) \| [\d.]+ \(n=1\) \|", table)
    for png in ("top1.png", f"cka_{DEIT}.png", f"cka_{MIXER}.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_second_invocation_skips_finished_runs(tiny_study, random_demo_teacher):
    out, first, _ = tiny_study
    assert first.returncode == 0, first.stderr[-3000:]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed0/last.pth.tar")}
    results = (out / "results.csv").read_text()
    again = run_cli("tools/fidelity_study.py", "--tiny", "--out", out, "--teacher-checkpoint", random_demo_teacher,
                    "--cka-images", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, skipped") == 4 and "starting" not in again.stdout
    assert len(stamps) == 4 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "results.csv").read_text() == results


@pytest.mark.slow
def test_same_seed_gives_the_same_top1_and_weights(tiny_study, random_demo_teacher, tmp_path):
    """A second grid's seed-0 RSD run equals the first grid's: top-1 and every weight (what a seed does not
    fix, nothing else may change; that another seed changes the start and the order is tested below)."""
    first_out, first, _ = tiny_study
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_cli("tools/fidelity_study.py", "--tiny", "--out", tmp_path, "--teacher-checkpoint",
                     random_demo_teacher, "--methods", "rsd", "--students", "deit_demo_32", "--cka-images", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [first_row] = [r for r in read_csv(first_out / "results.csv") if (r["pair"], r["method"]) == (DEIT, "rsd")]
    [again_row] = read_csv(tmp_path / "results.csv")
    for column in ("method", "pair", "seed", "best_top1", "last_top1"):
        assert again_row[column] == first_row[column]
    weights, repeated = run_weights(first_out, DEIT, "rsd"), run_weights(tmp_path, DEIT, "rsd")
    assert weights.keys() == repeated.keys() and all(torch.equal(weights[k], repeated[k]) for k in weights)


def test_seed_changes_initialisation_and_data_order_not_the_subset(tmp_path):
    """What train.py builds for --seed 0, 0 and 1 on a --train-subset: the student's initial weights and the
    epoch's order follow the seed, the images trained on do not (and they are class-balanced)."""
    def build(seed, name):
        argv = ["--dataset", "synthetic", "--synthetic-train-size", "128", "--train-subset", "64", "-b", "16",
                "--workers", "0", "--img-size", "32", "--model", "deit_demo_32", "--seed", str(seed),
                "--output", str(tmp_path), "--experiment", name]
        run = build_run(parse_args_with_config(build_train_parser(DISTILLERS), argv))
        run.writer.close()
        subset = run.data.train_loader.dataset  # unwrap the loader's dataset wrappers down to the subset
        while not hasattr(subset, "indices"):
            subset = subset.dataset
        order = [int(subset.indices[i]) for views in run.data.train_loader for i in views.index]
        return run.student.state_dict(), order

    weights0, order0 = build(0, "a")
    weights0_again, order0_again = build(0, "b")
    weights1, order1 = build(1, "c")
    assert all(torch.equal(weights0[k], weights0_again[k]) for k in weights0) and order0 == order0_again
    assert not all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert order0 != order1 and sorted(order0) == sorted(order1) and len(set(order0)) == 64
    labels = make_synthetic("train", 128, 10).labels[order0]
    assert sorted(np.bincount(labels, minlength=10)) == [6] * 6 + [7] * 4  # 64 = 10 x 6 + 4


def test_finished_runs_are_skipped_half_finished_ones_resumed(tmp_path):
    """One command for every start of a run: --resume auto continues a half-finished one (train.py's tests)."""
    folder = tmp_path / "pair" / "kd" / "seed3"
    command = study.train_command("cfg.yaml", str(folder), "deit_demo_32", "kd", 3, "/t.pth", ["--epochs", "1"])
    assert command[2:] == ["-c", "cfg.yaml", "--model", "deit_demo_32", "--distiller", "kd", "--seed", "3",
                           "--teacher-pretrained", "/t.pth", "--output", str(folder.parent), "--experiment", "seed3",
                           "--resume", "auto", "--epochs", "1"]
    folder.mkdir(parents=True)
    (folder / "args.yaml").write_text("epochs: 2\nseed: 3\n")
    (folder / "last.pth.tar").write_bytes(b"")
    (folder / "summary.csv").write_text("epoch,eval_top1\n0,50.0\n")
    assert not study.is_finished(folder)
    (folder / "summary.csv").write_text("epoch,eval_top1\n0,50.0\n1,60.0\n")
    assert study.is_finished(folder)


def write_run(out, pair, method, seed, top1, epochs=None, marker=None):
    folder = out / pair / method / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "args.yaml").write_text(f"epochs: {epochs or len(top1)}\n")
    (folder / "summary.csv").write_text("epoch,train_loss,eval_top1\n" +
                                        "".join(f"{e},1.0,{v}\n" for e, v in enumerate(top1)))
    if marker:
        study.write_marker(folder, marker)


def test_aggregate_only_collects_finished_runs(tmp_path):
    marker = {"wall_s": 61.34, "cpu": "Test CPU", "date": "2026-11-24"}
    write_run(tmp_path, DEIT, "kd", 0, [40.0, 70.5, 65.25], marker=marker)
    write_run(tmp_path, DEIT, "scratch", 1, [30.0, 55.0], marker=marker)
    write_run(tmp_path, DEIT, "rsd", 0, [35.0], epochs=3)  # half-finished: left out
    write_run(tmp_path, MIXER, "scratch", 0, [20.0, 25.0])  # finished, no marker (study killed just after)
    study.main(["--out", str(tmp_path), "--aggregate-only", "--cka-images", "0"])
    rows = read_csv(tmp_path / "results.csv")
    assert rows == [
        {"method": "scratch", "pair": DEIT, "seed": "1", "best_top1": "55.0", "last_top1": "55.0", "wall_s": "61.3",
         "cpu": "Test CPU", "date": "2026-11-24"},
        {"method": "kd", "pair": DEIT, "seed": "0", "best_top1": "70.5", "last_top1": "65.25", "wall_s": "61.3",
         "cpu": "Test CPU", "date": "2026-11-24"},
        {"method": "scratch", "pair": MIXER, "seed": "0", "best_top1": "25.0", "last_top1": "25.0", "wall_s": "",
         "cpu": "", "date": ""}]
    assert (tmp_path / "top1.png").read_bytes()[:4] == b"\x89PNG"


def test_table_of_a_known_csv(tmp_path):
    """Hand-made results -> table.md cells equal numpy's mean and sample std (ddof 1) of the same numbers."""
    last = {("scratch", DEIT): [70.1, 71.3, 69.8], ("rsd", DEIT): [75.0, 74.2, 76.1], ("rsd", MIXER): [72.5],
            ("kd", MIXER): [71.0, 73.5]}
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "pair", "seed", "best_top1", "last_top1", "wall_s", "cpu", "date"])
        for (method, pair), values in last.items():
            for seed, value in enumerate(values):
                writer.writerow([method, pair, seed, value + 1.0, value, 100, "CPU A", f"2026-11-2{seed}"])
    study.write_table(study.read_results_csv(path), tmp_path / "table.md")
    text = (tmp_path / "table.md").read_text()
    last_table = text.split("Last epoch:")[1].split("Best epoch")[0]
    best_table = text.split("Best epoch")[1]
    for table, offset in ((last_table, 0.0), (best_table, 1.0)):
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
        assert rows[0] == ["method", DEIT, MIXER]
        cells = {row[0]: row[1:] for row in rows[2:]}
        assert list(cells) == ["scratch", "kd", "rsd"]  # the study's method order
        for (method, pair), values in last.items():
            values = np.array(values) + offset
            cell = cells[method][[DEIT, MIXER].index(pair)]
            if len(values) == 1:
                assert cell == f"{values[0]:.2f} (n=1)"
            else:
                assert cell == f"{values.mean():.2f} ± {values.std(ddof=1):.2f} (n={len(values)})"
        assert cells["scratch"][1] == "-" and cells["kd"][0] == "-"
    assert "CPU: CPU A." in text and "Dates: 2026-11-20 to 2026-11-22." in text


def test_readme_table_is_the_committed_results():
    """The README's study table quotes results/fidelity/results.csv: recomputed here with statistics' own mean and
    sample std from the raw rows, every cell must match to the printed two decimals, 3 seeds each."""
    import os
    import statistics
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "results", "fidelity", "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    readme = open(os.path.join(repo, "README.md")).read()
    table = readme[readme.index("| method | ConvNeXt -> DeiT"):].split("\n\n")[0].splitlines()[2:]
    pairs = (DEIT, MIXER)
    assert [line.split("|")[1].strip().lower() for line in table] == ["scratch", "kd", "dkd", "ofa", "rsd"]
    for line in table:
        method = line.split("|")[1].strip().lower()
        for pair, cell in zip(pairs, line.split("|")[2:4]):
            mean, std = (float(x) for x in re.findall(r"\d+\.\d+", cell))
            seeds = [float(r["last_top1"]) for r in rows if r["method"] == method and r["pair"] == pair]
            assert len(seeds) == 3, (method, pair)
            assert (mean, std) == (round(statistics.mean(seeds), 2), round(statistics.stdev(seeds), 2)), (method, pair)


@pytest.mark.slow
def test_the_mixup_pairing_study_tabulates_both_pairings(tmp_path):
    """tools/mixup_pairing_study.py --tiny: one run per pairing through the study's runner, one row each."""
    from tools.mixup_pairing_study import main as pairing_main
    rows = pairing_main(["--tiny", "--out", str(tmp_path)])
    assert sorted(r["method"] for r in rows) == ["batch", "sample"]
    with open(tmp_path / "results.csv", newline="") as f:
        assert [r["pairing"] for r in csv.DictReader(f)] == ["batch", "sample"]
    args = yaml.safe_load((tmp_path / "sample" / "convnext_demo_32-deit_demo_32" / "rsd" / "seed0" / "args.yaml")
                          .read_text())
    assert (args["mixup_pairing"], args["mixup"], args["cutmix"]) == ("sample", 0.8, 1.0)
    assert "| sample |" in (tmp_path / "table.md").read_text()
