"""FitNets (Romero et al., ICLR 2015), CC (Peng et al., ICCV 2019) and RKD (Park et al., CVPR 2019), as the
OFA-KD and RSD code compute them: each loss against a plain float64 computation of its formula
(loops, gradients included), their invariances, FitNets' adapters on real timm models at 32 px, and the
global batch under DDP (two gloo processes with B/2 each give the loss of one process with B)."""
import argparse
import functools
import itertools

import pytest
import torch
from torch import nn

from distillers import DISTILLERS, build_distiller
from distillers.correlation import correlation_loss
from distillers.fitnet import as_map, fitnet_loss
from distillers.rkd import rkd_loss
from engine.config import parse_args_with_config
from engine.models import create_model
from engine.train_args import build_train_parser
from kdcore.errors import UserError
from kdcore.features import Features, extract_features
from kdcore.stages import StageInfo


def parse(*argv):
    return parse_args_with_config(build_train_parser(DISTILLERS), list(argv))


def smooth_l1(a, b):
    diff = (a - b).abs()
    return torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean()


# ---- FitNets ---------------------------------------------------------------------------------------------

def reference_fitnet(students, teachers):
    total = 0
    for s, t in zip(students, teachers):
        total = total + ((s.double() - t.double()) ** 2).sum() / s.numel()
    return total


def test_fitnet_loss_matches_formula_with_gradients():
    torch.manual_seed(0)
    students = [torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True),
                torch.randn(3, 16, 2, 2, dtype=torch.float64, requires_grad=True)]
    teachers = [torch.randn(3, 8, 4, 4, dtype=torch.float64), torch.randn(3, 16, 2, 2, dtype=torch.float64)]
    ours, ref = fitnet_loss(students, teachers), reference_fitnet(students, teachers)
    assert ours.dtype == torch.float64 and torch.allclose(ours, ref, rtol=1e-12)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, students), torch.autograd.grad(ref, students)):
        assert torch.allclose(g_ours, g_ref, rtol=1e-12)


def test_fitnet_loss_known_value_and_fp32_under_bf16():
    maps = [torch.zeros(2, 4, 3, 3), torch.zeros(2, 5, 1, 1)]
    assert fitnet_loss(maps, [m + 1 for m in maps]).item() == 2.0  # MSE 1 per stage, summed
    torch.manual_seed(1)
    s, t = [torch.randn(2, 4, 3, 3)], [torch.randn(2, 4, 3, 3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fitnet_loss(s, t)
    assert value.dtype == torch.float32 and torch.allclose(value.double(), reference_fitnet(s, t), rtol=1e-6)


def test_token_map_is_row_major_without_prefix():
    info = StageInfo(1, "token", "NLC", 2, (2 + 9, 4))  # 2 prefix tokens, then a 3 x 3 grid of width 4
    tokens = torch.arange(2 * 11 * 4.0).reshape(2, 11, 4)
    grid = as_map(tokens, info, (4, 3, 3))
    for b, h, w in itertools.product(range(2), range(3), range(3)):
        assert torch.equal(grid[b, :, h, w], tokens[b, 2 + h * 3 + w])


TEACHER_MAPS = {  # (C, H, W) of paper stages 1-4 at 32 px
    "deit_tiny_patch16_224": [(192, 2, 2)] * 4,
    "vit_tiny_patch16_224": [(192, 2, 2)] * 4,
    "mixer_s16_224": [(512, 2, 2)] * 4,
    "convnext_atto": [(40, 8, 8), (80, 4, 4), (160, 2, 2), (320, 1, 1)],
    "resnet18": [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)],
}
STUDENT_WIDTHS = {"resnet18": (64, 128, 256, 512), "deit_tiny_patch16_224": (192,) * 4,
                  "swin_pico_patch4_window7_224": (48, 96, 192, 384), "vit_tiny_patch16_224": (192,) * 4,
                  "mixer_s16_224": (512,) * 4}


@functools.lru_cache(maxsize=None)
def tiny_model(name, img_size=32):
    torch.manual_seed(0)
    return create_model(name, num_classes=10, img_size=img_size)


def build(name, student, teacher, *argv, input_size=(3, 32, 32)):
    args = parse("--distiller", name, *argv)
    return build_distiller(args, student, input_size=input_size, teacher=teacher, num_classes=10)


@pytest.mark.parametrize("student_name,teacher_name", [
    ("resnet18", "deit_tiny_patch16_224"),                  # CNN <- token (class token dropped)
    ("deit_tiny_patch16_224", "convnext_atto"),             # token <- CNN
    ("swin_pico_patch4_window7_224", "vit_tiny_patch16_224"),  # Swin <- ViT
    ("vit_tiny_patch16_224", "mixer_s16_224"),              # ViT <- Mixer (4 tokens: a 2 x 2 grid)
    ("mixer_s16_224", "resnet18"),                          # Mixer <- CNN
])
def test_fitnet_adapters_give_the_teachers_shape(student_name, teacher_name):
    teacher = tiny_model(teacher_name)
    distiller = build("fitnet", tiny_model(student_name), teacher)
    expected = TEACHER_MAPS[teacher_name]
    adapters = sum(w * c for w, (c, _, _) in zip(STUDENT_WIDTHS[student_name], expected))
    assert distiller.extra_parameter_count() == adapters  # one bias-free 1x1 conv per stage

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        teacher_feats = extract_features(teacher, images, distiller.teacher_request).detached_float()
    student_feats = extract_features(distiller.student, images, distiller.student_request)
    students, teachers = distiller.aligned_maps(student_feats, teacher_feats)
    assert [tuple(m.shape) for m in students] == [tuple(m.shape) for m in teachers] == [(2, *e) for e in expected]

    loss = distiller.distill_losses(student_feats, teacher_feats, None)["fitnet"]
    assert torch.allclose(loss, 0.1 * fitnet_loss(students, teachers))  # RSD code's extra 0.1, weight 1
    loss.backward()
    for adapter in distiller.adapters.values():
        assert adapter.conv.weight.grad.abs().sum() > 0


def test_fitnet_refuses_a_non_square_token_grid():
    student = create_model("deit_tiny_patch16_224", num_classes=10, img_size=(32, 48))  # 2 x 3 patches
    with pytest.raises(UserError, match="stage 2 has 6 patch tokens, not a square grid"):
        build("fitnet", student, create_model("resnet18", num_classes=10), "--fitnet-stage", "2",
              input_size=(3, 32, 48))


def test_fitnet_stage_selection_and_weight():
    student, teacher = tiny_model("resnet18"), tiny_model("convnext_atto")
    distiller = build("fitnet", student, teacher, "--fitnet-stage", "4", "2", "--fitnet-loss-weight", "3")
    assert list(distiller.adapters) == ["2", "4"] and distiller.teacher_request.stages == (2, 4)
    s = Features(stages={2: torch.zeros(1, 128, 4, 4), 4: torch.zeros(1, 512, 1, 1)})
    t = Features(stages={2: torch.ones(1, 80, 4, 4), 4: torch.ones(1, 320, 1, 1)})
    assert torch.allclose(distiller.distill_losses(s, t, None)["fitnet"], torch.tensor(3 * 0.1 * 2))


# ---- CC --------------------------------------------------------------------------------------------------

def reference_correlation(s, t, scale):
    n, d = s.shape
    total = 0
    for i in range(n - 1):
        for k in range(d):
            total = total + abs(s[i, k] - t[i, k]) * abs(s[i + 1, k] - t[i + 1, k])
    return scale * total / (n - 1)


def test_correlation_loss_matches_formula_with_gradients():
    torch.manual_seed(0)
    s = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ours, ref = correlation_loss(s, t, 0.02), reference_correlation(s, t, 0.02)
    assert ours.dtype == torch.float64 and torch.allclose(ours, ref, rtol=1e-12)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, (s, t)), torch.autograd.grad(ref, (s, t))):
        assert torch.allclose(g_ours, g_ref, rtol=1e-12)


def test_correlation_known_values():
    e = torch.randn(6, 4)
    assert correlation_loss(e, e.clone(), 0.02).item() == 0.0  # projected embeddings agree
    assert torch.isclose(correlation_loss(e + 1, e, 0.02), torch.tensor(0.02 * 4))  # |delta| = 1 everywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert correlation_loss(e + 1, e, 0.02).dtype == torch.float32


def test_correlation_modules_and_defaults():
    distiller = build("correlation", tiny_model("resnet18"), tiny_model("vit_tiny_patch16_224"))
    assert distiller.extra_parameter_count() == (512 + 1) * 128 + (192 + 1) * 128  # both sides' Linear
    assert distiller.embed_t.weight.requires_grad
    args = parse()
    assert (args.correlation_scale, args.correlation_feat_dim) == (0.02, 128)


# ---- RKD -------------------------------------------------------------------------------------------------

def reference_rkd(s, t, distance_weight, angle_weight, squared):
    def distances(x):
        n = len(x)
        d = torch.stack([torch.stack([(x[i] - x[j]).norm() ** (2 if squared else 1) if i != j else x.new_zeros(())
                                      for j in range(n)]) for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))  # mean of the off-diagonal (all positive) entries

    def cosines(x):
        n, zero = len(x), x.new_zeros(())
        out = []
        for i, j, k in itertools.product(range(n), repeat=3):
            a, b = x[j] - x[i], x[k] - x[i]
            out.append(zero if i in (j, k) else (a @ b) / (a.norm() * b.norm()))
        return torch.stack(out)

    return (distance_weight * smooth_l1(distances(s), distances(t))
            + angle_weight * smooth_l1(cosines(s), cosines(t)))


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_loss_matches_formula_with_gradients(squared):
    torch.manual_seed(0)
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 9, dtype=torch.float64) * 3  # another width: RKD has no projector
    ours = rkd_loss(s, t, 25.0, 50.0, 1e-12, squared)
    ref = reference_rkd(s, t, 25.0, 50.0, squared)
    assert ours.dtype == torch.float64 and torch.allclose(ours, ref, rtol=1e-10)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, s), torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-12)


def test_rkd_unchanged_by_scaling_both_embeddings():
    torch.manual_seed(1)
    s, t = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
    for squared in (False, True):
        base = rkd_loss(s, t, 25.0, 50.0, 1e-12, squared)
        assert base > 0
        assert torch.allclose(rkd_loss(7.5 * s, 7.5 * t, 25.0, 50.0, 1e-12, squared), base, rtol=1e-10)


def test_rkd_zero_for_the_same_relations_and_fp32_under_bf16():
    torch.manual_seed(2)
    s = torch.randn(8, 6)
    assert rkd_loss(s, 3 * s, 25.0, 50.0, 1e-12, False).item() < 1e-6
    t = torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = rkd_loss(s, t, 25.0, 50.0, 1e-12, False)
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), reference_rkd(s.double(), t.double(), 25.0, 50.0, False), rtol=1e-5)


def test_rkd_defaults_and_no_extra_modules():
    args = parse()
    assert (args.rkd_distance_weight, args.rkd_angle_weight, args.rkd_eps, args.rkd_squared) == (25, 50, 1e-12, False)
    assert build("rkd", tiny_model("resnet18"), tiny_model("vit_tiny_patch16_224")).extra_parameter_count() == 0


# ---- global batch under DDP ------------------------------------------------------------------------------

GLOBAL_BATCH, D_S, D_T = 8, 16, 12


class Widths(nn.Module):
    """Stands in for a model where a distiller reads only its embedding width."""

    def __init__(self, width):
        super().__init__()
        self.num_features = width


def losses_and_grads(name, rank, world):
    """This process's loss on its B/world slice of a fixed global batch, and the gradients it computes."""
    torch.manual_seed(0)
    s_all, t_all = torch.randn(GLOBAL_BATCH, D_S), torch.randn(GLOBAL_BATCH, D_T)
    args = argparse.Namespace(gt_loss_weight=1.0, kd_loss_weight=1.0, correlation_scale=0.02,
                              correlation_feat_dim=8, rkd_distance_weight=25.0, rkd_angle_weight=50.0,
                              rkd_eps=1e-12, rkd_squared=False, distiller=name, seed=0)
    distiller = build_distiller(args, Widths(D_S), teacher=Widths(D_T), num_classes=10)
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    s = s_all[part].clone().requires_grad_(True)
    loss = sum(distiller.distill_losses(Features(embedding=s), Features(embedding=t_all[part]), None).values())
    loss.backward()
    return {"loss": loss.detach(), "student": s.grad, **{n: p.grad for n, p in distiller.named_parameters()}}


def ddp_worker(rank, world):
    return {name: losses_and_grads(name, rank, world) for name in ("correlation", "rkd")}


@pytest.mark.slow
def test_two_processes_give_the_global_batch_loss(gloo_pair):
    ranks = gloo_pair.run(ddp_worker)
    for name in ("correlation", "rkd"):
        single = losses_and_grads(name, 0, 1)
        for rank, result in enumerate(r[name] for r in ranks):
            assert torch.allclose(result["loss"], single["loss"], rtol=1e-6)
            # The all-gather's backward sums the identical per-process gradients; DDP then averages them.
            part = single["student"][rank * GLOBAL_BATCH // 2:(rank + 1) * GLOBAL_BATCH // 2]
            assert torch.allclose(result["student"], 2 * part, rtol=1e-5, atol=1e-7)
            for key in set(single) - {"loss", "student"}:  # the CC projections see the whole batch on each rank
                assert torch.allclose(result[key], single[key], rtol=1e-5, atol=1e-7), (name, key)
