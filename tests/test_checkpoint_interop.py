"""What a timm user brings: checkpoints written by timm's train.py (an argparse.Namespace inside), .safetensors
files and compiled models' state dicts load as teacher and as --initial-checkpoint; any other pickled object is
still refused. --pretrained-path goes through timm's pretrained machinery (position embeddings resized), models
with two heads (distilled DeiT) train as students, and hf-hub: names load from the local Hugging Face cache or
fail with one clear error."""
import argparse
import collections
import contextlib
import copy
import json

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from conftest import SMALL_RUN, run_main
from timm.layers import resample_abs_pos_embed
from timm.optim import create_optimizer_v2

import validate
from distillers import DISTILLERS, build_distiller
from engine.config import parse_args_with_config
from engine.loop import train_step
from engine.models import create_model
from engine.run import build_student, ground_truth_criterion
from engine.sources import FrozenSource, build_teacher_model
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.errors import UserError
from kdcore.features import FeatureRequest, extract_features

SOURCE, CLASSES, IMG = "test_resnet", 10, 32
DISTILLED = "deit_tiny_distilled_patch16_224"


def parse(*argv):
    args = parse_args_with_config(build_train_parser(DISTILLERS), ["--img-size", str(IMG), *map(str, argv)])
    args.num_classes = CLASSES
    return args


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return create_model(SOURCE, num_classes=CLASSES, img_size=IMG)


def halved(state):
    """Other weights of the same architecture (standing in for an EMA)."""
    return {k: v / 2 if v.is_floating_point() else v for k, v in state.items()}


def save_timm_train_checkpoint(model, path):
    """The dict timm's train.py CheckpointSaver writes (model_best.pth.tar): its arguments as a Namespace, the
    EMA weights (with --model-ema) next to the model's."""
    torch.save({"epoch": 3, "arch": type(model).__name__.lower(), "state_dict": model.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(),
                "version": 2, "args": argparse.Namespace(model=SOURCE, num_classes=CLASSES, img_size=IMG,
                                                         dataset="torch/cifar10", lr=0.1),
                "metric": 71.5, "state_dict_ema": halved(model.state_dict())}, path)


def save_safetensors(model, path):
    safetensors.torch.save_file(model.state_dict(), str(path))


def save_compiled(model, path):
    """A torch.compile'd model's own state dict: every key under `_orig_mod.` (wrapping compiles nothing yet)."""
    state = torch.compile(model).state_dict()
    assert all(key.startswith("_orig_mod.") for key in state)
    torch.save(state, path)


FORMATS = {"model_best.pth.tar": save_timm_train_checkpoint, "weights.safetensors": save_safetensors,
           "compiled.pth": save_compiled}


@pytest.mark.parametrize("filename", FORMATS)
def test_timm_user_checkpoints_load_as_teacher_and_initial_checkpoint(source, tmp_path, filename):
    path = tmp_path / filename
    FORMATS[filename](source, path)
    torch.manual_seed(1)  # both models start from other weights than the file's
    teacher = build_teacher_model(parse("--teacher", SOURCE, "--teacher-pretrained", path), CLASSES, IMG)
    student = build_student(parse("--model", SOURCE, "--initial-checkpoint", path))
    for name, tensor in source.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], tensor), name
        assert torch.equal(student.state_dict()[name], tensor), name
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed for the load call only


def test_ema_weights_of_a_timm_train_checkpoint_as_teacher(source, tmp_path):
    path = tmp_path / "model_best.pth.tar"
    save_timm_train_checkpoint(source, path)
    args = parse("--teacher", SOURCE, "--teacher-pretrained", path, "--use-ema-teacher")
    teacher = build_teacher_model(args, CLASSES, IMG)
    for name, tensor in halved(source.state_dict()).items():
        assert torch.equal(teacher.state_dict()[name], tensor), name


def test_validate_reads_the_model_from_timm_train_arguments(source, tmp_path, capsys):
    path = tmp_path / "model_best.pth.tar"
    save_timm_train_checkpoint(source, path)
    validate.main(["--dataset", "synthetic", "--checkpoint", str(path), "--synthetic-val-size", "8", "-b", "8",
                   "--workers", "0"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["model"], result["img_size"]) == (SOURCE, IMG)
    assert result["param_count"] == sum(p.numel() for p in source.parameters())


class NotWeights(collections.OrderedDict):
    """A type of this test module, which weights_only=True does not allow (unpickling it imports this module)."""


def test_pickles_of_other_objects_are_refused(source, tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"state_dict": NotWeights(source.state_dict()), "args": argparse.Namespace(model=SOURCE)}, path)
    with pytest.raises(UserError, match=r"weights_only=True") as caught:
        build_teacher_model(parse("--teacher", SOURCE, "--teacher-pretrained", path), CLASSES, IMG)
    assert "test_checkpoint_interop.NotWeights" in str(caught.value)


@pytest.fixture(scope="module")
def distilled_deit():
    """deit_tiny_distilled_patch16_224 at 32 px, random init (2 x 2 patches behind the class and distillation
    tokens); built once, copied by the tests that train it."""
    torch.manual_seed(0)
    return create_model(DISTILLED, num_classes=CLASSES, img_size=IMG)


def train_two_steps(distiller_name, student, teacher_model):
    """Two SGD steps of `student` distilled from `teacher_model` at 32 px; returns the weights it started with."""
    args = parse("--distiller", distiller_name, "--teacher", SOURCE, "--smoothing", "0", "-b", "4")
    args.num_classes = CLASSES
    distiller = build_distiller(args, student, input_size=IMG, teacher=teacher_model,
                                gt_criterion=ground_truth_criterion(args), dataset_size=8,
                                train_labels=torch.arange(8) % CLASSES).train()
    teacher = FrozenSource(teacher_model, distiller.teacher_request, "cpu")
    optimizer = create_optimizer_v2(distiller, opt="sgd", lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        images = torch.randn(4, 3, IMG, IMG, generator=generator)
        labels = torch.randint(0, CLASSES, (4,), generator=generator)
        batch = Batch(images=images, targets=labels, labels=labels, index=torch.arange(4) + 4 * step, lam=1.0)
        loss, losses = train_step(distiller, teacher, optimizer, batch, autocast=contextlib.nullcontext)
        assert torch.isfinite(loss) and set(losses) > {"ce"}, losses
    return before


@pytest.mark.parametrize("distiller_name", ["kd", "rsd"])
def test_distilled_deit_trains_as_a_student(distilled_deit, source, distiller_name):
    student = copy.deepcopy(distilled_deit)
    before = train_two_steps(distiller_name, student, copy.deepcopy(source))
    for name in ("head.weight", "head_dist.weight", "dist_token", "blocks.0.attn.qkv.weight"):
        assert not torch.equal(student.state_dict()[name], before[name]), name


def test_distilled_logits_are_the_mean_of_both_heads_in_train_mode(distilled_deit):
    """The losses see one logits tensor: timm's eval-time mean of the class and distillation heads."""
    model = copy.deepcopy(distilled_deit).train()
    images = torch.randn(2, 3, IMG, IMG)
    tokens = model.forward_features(images)
    expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
    logits = extract_features(model, images, FeatureRequest(logits=True)).logits
    torch.testing.assert_close(logits, expected)


def test_a_two_head_checkpoint_of_another_class_count_is_named(distilled_deit, tmp_path):
    torch.save(distilled_deit.state_dict(), tmp_path / "deit.pth")
    with pytest.raises(UserError, match=f"has a {CLASSES}-class head but .* was built with 5 classes"):
        build_teacher_model(parse("--teacher", DISTILLED, "--teacher-pretrained", tmp_path / "deit.pth"), 5, IMG)


def test_pretrained_path_resizes_position_embeddings_and_adapts_the_head(tmp_path):
    torch.manual_seed(0)
    source_224 = create_model(DISTILLED, num_classes=CLASSES)
    path = tmp_path / "deit_224.pth"
    torch.save({"state_dict": source_224.state_dict()}, path)
    torch.manual_seed(1)
    same_classes = build_student(parse("--model", DISTILLED, "--pretrained-path", path))
    expected = resample_abs_pos_embed(source_224.pos_embed, new_size=(IMG // 16, IMG // 16), num_prefix_tokens=2)
    assert same_classes.pos_embed.shape == (1, 2 + (IMG // 16) ** 2, 192)
    torch.testing.assert_close(same_classes.pos_embed, expected, rtol=0, atol=0)
    for name in ("head.weight", "head_dist.weight", "blocks.11.mlp.fc2.weight", "dist_token"):
        assert torch.equal(same_classes.state_dict()[name], source_224.state_dict()[name]), name

    args = parse("--model", DISTILLED, "--pretrained-path", path)
    args.num_classes = 5
    other_classes = build_student(args)
    assert other_classes.head.weight.shape == other_classes.head_dist.weight.shape == (5, 192)
    assert torch.equal(other_classes.blocks[11].mlp.fc2.weight, source_224.blocks[11].mlp.fc2.weight)

    with pytest.raises(UserError, match="--pretrained-path file not found"):
        build_student(parse("--model", DISTILLED, "--pretrained-path", tmp_path / "missing.pth"))


def test_pretrained_path_of_another_architecture_is_refused(source, tmp_path):
    """timm loads non-strictly when it re-initialises the head: a file that sets nothing else must not pass."""
    torch.save(source.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"does not fit 'deit_tiny_distilled_patch16_224' \(missing: "):
        build_student(parse("--model", DISTILLED, "--pretrained-path", tmp_path / "resnet.pth"))


def fill_hub_cache(cache, repo_id, architecture):
    """A Hugging Face cache holding `repo_id`'s timm config.json at revision main, as the hub client lays it out."""
    commit = "0" * 40
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": architecture, "num_classes": 1000,
        "pretrained_cfg": {"input_size": [3, 224, 224], "num_classes": 1000, "classifier": "fc",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))


def test_hub_names_load_from_the_local_cache_offline(source, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fill_hub_cache(tmp_path / "hub", "someone/test-resnet", SOURCE)
    path = tmp_path / "teacher.pth"
    torch.save(source.state_dict(), path)
    name = "hf-hub:someone/test-resnet"
    teacher = build_teacher_model(parse("--teacher", name, "--teacher-pretrained", path), CLASSES, IMG)
    student = build_student(parse("--model", name))
    assert type(teacher) is type(student) is type(source)
    assert torch.equal(teacher.fc.weight, source.fc.weight) and student.fc.out_features == CLASSES


def test_hub_name_offline_without_cache_is_one_clear_error(tmp_path, monkeypatch):
    # what HF_HUB_OFFLINE=1 HF_HUB_CACHE=... in the environment set when huggingface_hub is imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_main("train.py", *SMALL_RUN, "--model", "hf-hub:timm/resnet18.a1_in1k", "--epochs", "1",
                      "--output", tmp_path / "runs")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: could not fetch 'hf-hub:timm/resnet18.a1_in1k'" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "Hugging Face cache" in result.stderr
    assert not (tmp_path / "runs").exists()
