"""build_optimizer: timm's layer-decay / weight-decay groups computed on the student, the distiller's own
modules in groups of their own (defect 7: --layer-decay used to have no effect)."""
import pytest
import timm
import torch
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn

from distillers import DISTILLERS, Distiller, build_distiller
from engine.optim import build_optimizer
from engine.train_args import build_train_parser
from kdcore.errors import UserError

DEPTH = 4
LR, WD = 1e-3, 0.05


class WithProjector(Distiller):
    """A distiller owning one extra module, as RSD owns its AAD: Linear (with bias) + BatchNorm1d."""

    def __init__(self, student, context):
        super().__init__(student, context)
        self.projector = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))


def _args(*flags):
    return build_train_parser(DISTILLERS).parse_args(
        ["--opt", "adamw", "--lr", str(LR), "--weight-decay", str(WD), *flags])


def _distiller(args):
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10, depth=DEPTH)
    return build_distiller(args, student, num_classes=10, distiller_cls=WithProjector)


def _group_of(optimizer, param):
    found = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    assert len(found) == 1, f"parameter in {len(found)} groups"
    return found[0]


def _scale(group):
    return group.get("lr_scale", 1.0)


def _assert_partition(optimizer, distiller):
    """Every trainable parameter of the distiller is in exactly one group, and nothing else is."""
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    assert len({id(p) for p in grouped}) == len(grouped)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    assert sum(p.numel() for p in grouped) == sum(p.numel() for p in trainable)


def test_layer_decay_scales_follow_student_depth():
    args = _args("--layer-decay", "0.5")
    distiller = _distiller(args)
    optimizer = build_optimizer(distiller, args)
    student = distiller.student
    _assert_partition(optimizer, distiller)

    # Stem (patch embed, tokens), one layer per block, then the head: the stem is depth + 1 layers below it.
    num_blocks = len(student.blocks)
    assert _scale(_group_of(optimizer, student.patch_embed.proj.weight)) == pytest.approx(0.5 ** (num_blocks + 1))
    assert _scale(_group_of(optimizer, student.blocks[0].mlp.fc1.weight)) == pytest.approx(0.5 ** num_blocks)
    assert _scale(_group_of(optimizer, student.blocks[-1].attn.qkv.weight)) == pytest.approx(0.5)
    assert _scale(_group_of(optimizer, student.head.weight)) == pytest.approx(1.0)

    # The student's own no_weight_decay() names and 1-D params are not decayed; matrices are.
    assert _group_of(optimizer, student.pos_embed)["weight_decay"] == 0
    assert _group_of(optimizer, student.cls_token)["weight_decay"] == 0
    assert _group_of(optimizer, student.blocks[1].norm1.weight)["weight_decay"] == 0
    assert _group_of(optimizer, student.blocks[1].attn.qkv.weight)["weight_decay"] == WD

    # The extra module: lr scale 1, no decay for its BN and its Linear bias, decay for its Linear weight.
    linear, bn = distiller.projector
    for p in (linear.weight, linear.bias, bn.weight, bn.bias):
        assert _scale(_group_of(optimizer, p)) == 1.0
    assert _group_of(optimizer, linear.weight)["weight_decay"] == WD
    for p in (linear.bias, bn.weight, bn.bias):
        assert _group_of(optimizer, p)["weight_decay"] == 0


def test_scheduler_applies_layer_scale():
    args = _args("--layer-decay", "0.5", "--warmup-epochs", "0", "--epochs", "10")
    distiller = _distiller(args)
    optimizer = build_optimizer(distiller, args)
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    expected_scale = 0.5 ** (len(distiller.student.blocks) + 1)
    scheduler.step(0)
    assert _group_of(optimizer, distiller.student.patch_embed.proj.weight)["lr"] == pytest.approx(LR * expected_scale)
    assert _group_of(optimizer, distiller.projector[0].weight)["lr"] == pytest.approx(LR)
    scheduler.step(5)  # mid-cosine: the ratio to an unscaled group stays the layer scale
    ratio = (_group_of(optimizer, distiller.student.patch_embed.proj.weight)["lr"]
             / _group_of(optimizer, distiller.student.head.weight)["lr"])
    assert ratio == pytest.approx(expected_scale)


def test_weight_decay_groups_without_layer_decay():
    args = _args()
    distiller = _distiller(args)
    optimizer = build_optimizer(distiller, args)
    _assert_partition(optimizer, distiller)
    assert all("lr_scale" not in g or g["lr_scale"] == 1.0 for g in optimizer.param_groups)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == WD for p in g["params"]}
    assert all(g["weight_decay"] in (0, WD) for g in optimizer.param_groups)
    no_decay_names = {f"student.{n}" for n in distiller.student.no_weight_decay()}
    for name, p in distiller.named_parameters():
        expect_decay = p.ndim > 1 and name not in no_decay_names
        assert (id(p) in decayed) == expect_decay, name


def test_groups_are_named():
    args = _args("--layer-decay", "0.5")
    optimizer = build_optimizer(_distiller(args), args)
    names = [g["name"] for g in optimizer.param_groups]
    assert len(set(names)) == len(names)
    assert {n.split("_")[0] for n in names} == {"student", "extra"}


def test_zero_weight_decay_puts_nothing_in_decay():
    args = _args("--weight-decay", "0")
    optimizer = build_optimizer(_distiller(args), args)
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups)


def test_rejected_settings_are_user_errors():
    args = build_train_parser(DISTILLERS).parse_args(["--opt", "sgd", "--momentum", "0"])
    with pytest.raises(UserError, match="optimizer settings rejected"):
        build_optimizer(_distiller(args), args)
