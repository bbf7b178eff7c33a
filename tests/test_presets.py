"""The 27 paper presets (configs/presets/, Tables 1 and 2): what they set, that each pair builds and computes
its loss at 224 px, the per-method settings on top of them, and how train.sh and the launchers take them."""
import functools
import glob
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import yaml
from cifar_format import write_cifar100
from conftest import REPO
from paper_widths import EMBEDDING_WIDTHS

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.loader import build_mixup
from engine.loop import make_batch
from engine.models import create_model
from engine.run import build_distiller_for, build_student
from engine.sources import FrozenSource
from engine.train_args import build_train_parser
from tools import overhead

TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "vit_small": "vit_small_patch16_224",
              "mixer_b16": "mixer_b16_224", "convnext_tiny": "convnext_tiny", "deit_tiny": "deit_tiny_patch16_224",
              "swin_pico": "swin_pico_patch4_window7_224", "swin_nano": "swin_nano_patch4_window7_224",
              "resmlp_12": "resmlp_12_224", "resnet18": "resnet18", "resnet50": "resnet50",
              "mobilenetv2": "mobilenetv2_100"}
CNN_STUDENTS = ("resnet18", "mobilenetv2")
# RSD's top-1 of each pair (Tables 1 and 2); True: the paper combined it with FitNets (*)
PAPER_RSD = {
    "cifar100": {"swin_tiny-resnet18": 83.92, "vit_small-resnet18": 81.50, "mixer_b16-resnet18": 81.85,
                 "swin_tiny-mobilenetv2": 83.68, "vit_small-mobilenetv2": 81.68, "mixer_b16-mobilenetv2": 81.74,
                 "convnext_tiny-deit_tiny": 82.46, "mixer_b16-deit_tiny": 78.50, "convnext_tiny-swin_pico": 82.21,
                 "mixer_b16-swin_pico": 81.28, "convnext_tiny-resmlp_12": 84.21, "swin_tiny-resmlp_12": 82.67},
    "imagenet": {"deit_tiny-resnet18": 71.70, "swin_tiny-resnet18": 72.13, "mixer_b16-resnet18": 71.41,
                 "deit_tiny-mobilenetv2": 72.18, "swin_tiny-mobilenetv2": 72.36, "mixer_b16-mobilenetv2": 71.90,
                 "resnet50-deit_tiny": 76.17, "convnext_tiny-deit_tiny": 74.46, "mixer_b16-deit_tiny": 74.26,
                 "resnet50-swin_nano": 78.78, "convnext_tiny-swin_nano": 77.70, "mixer_b16-swin_nano": 76.55,
                 "resnet50-resmlp_12": 78.32, "convnext_tiny-resmlp_12": 78.41, "swin_tiny-resmlp_12": 77.61},
}
STARRED = {"resnet50-deit_tiny", "resnet50-swin_nano", "resnet50-resmlp_12"}
PRESETS = [f"configs/presets/{dataset}/{pair}.yaml" for dataset, pairs in PAPER_RSD.items() for pair in pairs]
RECIPE_FOLDER = {"cifar100": "cifar", "imagenet": "imagenet"}


def parse(argv):
    return parse_args_with_config(build_train_parser(DISTILLERS), argv)


def pair_of(preset):
    dataset, name = preset.split("/")[-2], os.path.basename(preset)[:-len(".yaml")]
    teacher, student = name.split("-")
    return dataset, name, teacher, student


def test_the_presets_are_the_papers_27_pairs():
    found = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs/presets/*/*.yaml")))
    assert found == sorted(PRESETS) and len(found) == 27
    assert sorted(os.path.relpath(p, REPO) for p in overhead.paper_presets()) == found


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sets_the_pair_and_the_recipe_of_its_student(preset):
    dataset, name, teacher, student = pair_of(preset)
    args = parse(["data", "-c", preset])
    assert (args.model, args.teacher, args.distiller, args.dataset) == (
        TIMM_NAMES[student], TIMM_NAMES[teacher], "rsd", dataset)
    assert args.num_classes == {"cifar100": 100, "imagenet": 1000}[dataset]
    assert args.teacher_pretrained == f"pretrained/{TIMM_NAMES[teacher]}_{dataset}.pth"
    recipe_file = f"configs/{RECIPE_FOLDER[dataset]}/{'cnn' if student in CNN_STUDENTS else 'vit_mlp'}.yaml"
    with open(os.path.join(REPO, recipe_file)) as f:
        recipe_keys = yaml.safe_load(f)
    recipe = parse(["data", "-c", recipe_file])
    for key in recipe_keys:
        assert getattr(args, key) == getattr(recipe, key), key

    text = open(os.path.join(REPO, preset)).read()
    numbers = re.search(r"scratch (\d+\.\d\d), KD (\d+\.\d\d), OFA (\d+\.\d\d)\*?, RSD (\d+\.\d\d)", text)
    assert numbers and float(numbers.group(4)) == PAPER_RSD[dataset][name]
    assert ("FitNets" in text) == (name in STARRED and dataset == "imagenet")


@functools.lru_cache(maxsize=None)
def _teacher(name, num_classes):
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, img_size=224)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds_and_computes_its_loss_at_224(preset):
    """Student, teacher (random weights) and distiller as train.py builds them; the full loss on 2 images."""
    args = parse(["data", "-c", preset, "-b", "2"])
    torch.manual_seed(0)
    student = build_student(args)
    teacher_model = _teacher(args.teacher, args.num_classes)
    mixup = build_mixup(args, args.num_classes)
    data = types.SimpleNamespace(config={"input_size": (3, 224, 224)}, train_size=2,
                                 train_labels=torch.tensor([0, 1]))
    distiller = build_distiller_for(args, types.SimpleNamespace(world_size=1), student, teacher_model, {}, data)
    distiller.train()
    teacher = FrozenSource(teacher_model, distiller.teacher_request, "cpu", "fp32")
    batch = make_batch(torch.randn(2, 3, 224, 224), torch.tensor([3, 7]), torch.tensor([0, 1]), "cpu", mixup)
    logits, losses = distiller(batch, teacher(batch))
    assert logits.shape == (2, args.num_classes) and set(losses) == {"ce", "rsd"}
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.requires_grad
    # RSD's only extra module is the AAD: Linear(D_s -> h) and Linear(h -> D_t) without bias, BatchNorm1d(h)'s weight
    # and bias, h = gamma * D_s with the paper's gamma 2; the widths come from the architectures, not the models.
    d_s, d_t = EMBEDDING_WIDTHS[args.model], EMBEDDING_WIDTHS[args.teacher]
    hidden = 2 * d_s
    assert args.rsd_gamma == 2 and not args.rsd_branch_stage
    assert distiller.extra_parameter_count() == hidden * (d_s + 2 + d_t), (d_s, d_t)


@pytest.mark.parametrize("preset, lr", [("configs/presets/imagenet/convnext_tiny-swin_nano.yaml", 5e-4),
                                        ("configs/presets/imagenet/swin_tiny-resnet18.yaml", 0.1)])
def test_ofa_on_an_imagenet_preset_takes_the_papers_ofa_settings(preset, lr):
    rsd = parse(["data", "-c", preset])
    ofa = parse(["data", "-c", preset, "--distiller", "ofa"])
    assert (ofa.distiller, ofa.ofa_eps, ofa.lr) == ("ofa", [1.5], lr)
    assert rsd.lr == (1e-3 if lr == 5e-4 else 0.1)  # RSD keeps the recipe's lr
    assert parse(["data", "-c", preset, "--distiller", "ofa", "--ofa-eps", "2"]).ofa_eps == [2.0]
    assert parse(["data", "-c", preset, "--distiller", "ofa", "--lr", "0.01"]).lr == 0.01


def test_ofa_on_a_cifar_preset_takes_eps_1():
    preset = "configs/presets/cifar100/convnext_tiny-deit_tiny.yaml"
    ofa = parse(["data", "-c", preset, "--distiller", "ofa"])
    assert (ofa.ofa_eps, ofa.lr) == ([1.0], 5e-4)
    assert parse(["data", "-c", preset, "--distiller", "ofa", "--ofa-eps", "2"]).ofa_eps == [2.0]


def _train_sh(tmp_path, *args, data_dir=None):
    """`bash train.sh ARGS` with a fake torchrun first on PATH that prints the arguments it got, one per line."""
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "TEACHER_CKPT")}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    if data_dir:
        env["DATA_DIR"] = data_dir
    result = subprocess.run(["bash", os.path.join(REPO, "train.sh"), *args], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("config", [["-c", PRESETS[0]], ["--config", PRESETS[0]], [f"--config={PRESETS[0]}"]])
def test_train_sh_launches_a_config_with_just_the_users_arguments(tmp_path, config):
    got = _train_sh(tmp_path, "2", *config, "--epochs", "3")
    assert got == ["--nproc_per_node", "2", "train.py", *config, "--epochs", "3"]
    with_data = _train_sh(tmp_path, "2", *config, data_dir="/data/cifar 100")
    assert with_data == ["--nproc_per_node", "2", "train.py", "/data/cifar 100", *config]


def test_train_sh_without_a_config_still_runs_the_default_pair(tmp_path):
    got = _train_sh(tmp_path, "2", "--epochs", "3")
    assert got[:4] == ["--nproc_per_node", "2", "train.py", "data/cifar100"]
    assert got[got.index("--model") + 1] == "resnet18" and got[-2:] == ["--epochs", "3"]


@pytest.mark.slow
def test_seed_command_with_ofa_runs_on_two_processes(tmp_path, saved_weights):
    """The OFA command line users paste from the OFA-KD/RSD code (torch.distributed.launch --nproc_per_node=2
    train.py ... --distiller ofa --ofa-eps 1.0), as written, on a generated CIFAR-100 folder: 2 gloo processes."""
    data = write_cifar100(tmp_path / "cifar100", n_train=8, n_test=4)
    teacher_ckpt = saved_weights("swin_tiny_patch4_window7_224", num_classes=100, img_size=224)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "train.py", data,
           "--config", "configs/cifar/cnn.yaml", "--model", "resnet18", "--teacher", "swin_tiny_patch4_window7_224",
           "--teacher-pretrained", teacher_ckpt, "--num-classes", "100", "--distiller", "ofa", "--ofa-eps", "1.0",
           "--epochs", "1", "-b", "2", "--workers", "0", "--log-interval", "1",
           "--output", str(tmp_path / "runs"), "--experiment", "seed"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "runs" / "seed" / "log.txt").read_text()
    assert "2 process(es)" in log and "input (3, 224, 224)" in log and "Done:" in log
    assert "Distiller ofa: 1,626,256 extra trainable parameters" in log  # as tools/overhead.py counts it
    saved = parse(["-c", str(tmp_path / "runs" / "seed" / "args.yaml")])
    assert (saved.distiller, saved.ofa_eps, saved.lr) == ("ofa", [1.0], 0.05)


@pytest.mark.slow
def test_a_preset_runs_under_torchrun(tmp_path, saved_weights):
    """`torchrun --nproc_per_node 2 train.py DATA -c PRESET` (torchrun is torch.distributed.run): a ViT-recipe
    preset with mixup, its teacher checkpoint replaced by random weights, shrunk to 2 steps per process."""
    data = write_cifar100(tmp_path / "cifar100", n_train=8, n_test=4)
    teacher_ckpt = saved_weights("convnext_tiny", num_classes=100, img_size=224)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", data,
           "-c", "configs/presets/cifar100/convnext_tiny-deit_tiny.yaml", "--teacher-pretrained", teacher_ckpt,
           "--epochs", "1", "-b", "2", "--workers", "0", "--log-interval", "1",
           "--output", str(tmp_path / "runs"), "--experiment", "preset"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "runs" / "preset" / "log.txt").read_text()
    assert "2 process(es)" in log and "Data: cifar100" in log and "Done:" in log
    assert "Student deit_tiny_patch16_224" in log and "Distiller rsd:" in log
    saved = parse(["-c", str(tmp_path / "runs" / "preset" / "args.yaml")])
    assert (saved.lr, saved.mixup, saved.opt) == (5e-4, 0.8, "adamw")


ONE_PER_TEACHER = {pair_of(p)[2]: p for p in reversed(PRESETS)}  # a preset for each teacher of the tables


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(ONE_PER_TEACHER.values()))
def test_pat_computes_its_loss_on_a_preset_of_each_teacher(preset):
    args = parse(["data", "-c", preset, "-b", "2", "--distiller", "pat"])
    torch.manual_seed(0)
    student, teacher_model = build_student(args), _teacher(args.teacher, args.num_classes)
    data = types.SimpleNamespace(config={"input_size": (3, 224, 224)}, train_size=2, train_labels=torch.tensor([0, 1]))
    distiller = build_distiller_for(args, types.SimpleNamespace(world_size=1), student, teacher_model, {}, data).train()
    teacher = FrozenSource(teacher_model, distiller.teacher_request, "cpu", "fp32")
    distiller.attach_teacher(teacher)
    batch = make_batch(torch.randn(2, 3, 224, 224), torch.tensor([3, 7]), torch.tensor([0, 1]), "cpu",
                       build_mixup(args, args.num_classes))
    logits, losses = distiller(batch, teacher(batch))
    assert logits.shape == (2, args.num_classes) and set(losses) == {"ce", "kd", "hcl", "reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(block.beta.grad) and block.beta.grad != 0 for block in distiller.prompts.values())
