"""OFA (Hao et al., NeurIPS 2023, as its official code computes it): ofa_loss against the formula computed
another way, the --ofa-eps rule, the stage branches by student family (prefix tokens, small grids) and the RSD
paper's (ICCV 2025) Figure 3 parameter overhead."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillers import DISTILLERS, build_distiller
from distillers.branches import SepConv, TokenBranch
from distillers.ofa import ofa_loss, stage_eps
from engine.config import parse_args_with_config
from engine.models import create_model
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.errors import UserError
from kdcore.features import Features, extract_features
from kdcore.stages import StageInfo


def reference_ofa(student, teacher, labels, eps, temperature):
    """Per sample, by explicit exponentials in float64: -sum_c [(p_t,c + y_c)^eps - y_c] * log p_s,c."""
    total = 0.0
    for s, t, y in zip(student.double() / temperature, teacher.double() / temperature, labels):
        log_p_s = s - s.max() - torch.log(torch.exp(s - s.max()).sum())
        p_t = torch.exp(t - t.max()) / torch.exp(t - t.max()).sum()
        onehot = torch.zeros_like(p_t)
        onehot[y] = 1.0
        total = total - (((p_t + onehot) ** eps - onehot) * log_p_s).sum()
    return total / student.shape[0]


def hard_labels(kind, generator, batch=6, classes=7):
    """Class indices, or the argmax of mixup-style soft targets (how the reference reduces them)."""
    a = torch.randint(0, classes, (batch,), generator=generator)
    if kind == "onehot":
        return a
    b = torch.randint(0, classes, (batch,), generator=generator)
    lam = torch.rand(batch, 1, generator=generator)
    soft = lam * F.one_hot(a, classes) + (1 - lam) * F.one_hot(b, classes) + 0.1 / classes
    return soft.argmax(dim=1)


@pytest.mark.parametrize("targets", ["onehot", "soft"])
@pytest.mark.parametrize("eps,temperature", [(1.0, 1.0), (1.5, 1.0), (0.5, 4.0), (2.0, 2.0)])
def test_ofa_loss_matches_formula_with_gradients(targets, eps, temperature):
    g = torch.Generator().manual_seed(int(eps * 10 + temperature))
    student = (torch.randn(6, 7, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = torch.randn(6, 7, generator=g, dtype=torch.float64) * 3
    labels = hard_labels(targets, g)
    ours = ofa_loss(student, teacher, F.one_hot(labels, 7), eps, temperature)
    ref = reference_ofa(student, teacher, labels, eps, temperature)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-10)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_ref,) = torch.autograd.grad(ref, student)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_eps_one_with_one_hot_teacher_is_cross_entropy_on_teacher_class(temperature):
    """(p_t + y)^1 - y = p_t: the label drops out and only the teacher's class is left."""
    torch.manual_seed(0)
    student = torch.randn(5, 10, dtype=torch.float64)
    teacher_class = torch.tensor([3, 0, 9, 3, 5])
    labels = torch.tensor([1, 0, 2, 7, 5])
    teacher = 1e4 * F.one_hot(teacher_class, 10).double()
    value = ofa_loss(student, teacher, F.one_hot(labels, 10), 1.0, temperature)
    assert torch.allclose(value, F.cross_entropy(student / temperature, teacher_class), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_of_magnitude_1e4_are_finite(dtype):
    torch.manual_seed(0)
    student = (torch.randn(8, 100) * 1e4).to(dtype).requires_grad_(True)
    teacher = (torch.randn(8, 100) * 1e4).to(dtype)
    mask = F.one_hot(torch.randint(0, 100, (8,)), 100)
    for eps in (1.0, 1.5):
        value = ofa_loss(student, teacher, mask, eps, 1.0)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(ofa_loss(student, teacher, mask, 1.5, 1.0))


def test_eps_broadcast_and_count():
    assert stage_eps([1, 2, 3, 4], [1.5]) == ({1: 1.5, 2: 1.5, 3: 1.5, 4: 1.5}, 1.5)
    assert stage_eps([4, 2], [0.5, 1.0, 2.0]) == ({4: 0.5, 2: 1.0}, 2.0)
    assert stage_eps([], [1.2]) == ({}, 1.2)
    for stages, eps in (([1, 2, 3, 4], [1.0, 1.0]), ([1, 2, 3, 4], [1.0] * 4), ([], [1.0, 2.0])):
        with pytest.raises(UserError, match="--ofa-eps"):
            stage_eps(stages, eps)


def build(name, student, teacher, img_size, num_classes, *argv):
    args = parse_args_with_config(build_train_parser(DISTILLERS), ["--distiller", name, *argv])
    args.num_classes = num_classes
    return build_distiller(args, student, input_size=img_size, teacher=teacher)


def test_wrong_eps_count_is_a_user_error():
    student, teacher = create_model("resnet18", 10), create_model("resnet18", 10)
    with pytest.raises(UserError, match="--ofa-eps"):
        build("ofa", student, teacher, 32, 10, "--ofa-stage", "1", "2", "--ofa-eps", "1", "1")


@pytest.fixture(scope="module")
def swin_nano_and_convnext_tiny():
    torch.manual_seed(0)
    return create_model("swin_nano_patch4_window7_224", 1000), create_model("convnext_tiny", 1000)


def test_figure3_overhead_swin_nano_from_convnext_tiny(swin_nano_and_convnext_tiny):
    """Token branches for Swin-N at 224 px: 28,187,040 extra parameters (OFA, Figure 3); RSD's AAD with
    gamma 4: 2,625,536."""
    student, teacher = swin_nano_and_convnext_tiny
    ofa = build("ofa", student, teacher, 224, 1000)
    assert all(isinstance(b, TokenBranch) for b in ofa.branches.values())
    assert ofa.extra_parameter_count() == 28_187_040
    assert build("rsd", student, teacher, 224, 1000, "--rsd-gamma", "4").extra_parameter_count() == 2_625_536


def test_swin_pico_small_grid_starts_with_linear():
    """At 32 px the Swin-P stage grids are 8, 4, 2, 1: no merge; stage 1 (48 wide) starts with
    Linear(48 -> 384), stage 4 (already 384 wide) with nothing; 3, 2, 1, 1 ViT blocks."""
    student, teacher = create_model("swin_pico_patch4_window7_224", 10, img_size=32), create_model("resnet18", 10)
    branches = build("ofa", student, teacher, 32, 10).branches
    entries = [branches[str(s)].entry for s in (1, 2, 3, 4)]
    assert [(e.in_features, e.out_features) for e in entries[:3]] == [(48, 384), (96, 384), (192, 384)]
    assert isinstance(entries[3], nn.Identity)
    assert [len(branches[str(s)].blocks) for s in (1, 2, 3, 4)] == [3, 2, 1, 1]
    assert all(block.attn.num_heads == 4 for s in (1, 2, 3, 4) for block in branches[str(s)].blocks)


def test_cnn_branch_structure_and_stage4_count():
    """ResNet18 <- ConvNeXt-atto (D_t 320): stage s gets 4 - s SepConvs doubling channels, the last to
    max(512, 320); stage 4 Conv1x1(512 -> 512) + Linear(512 -> 10)."""
    student, teacher = create_model("resnet18", 10), create_model("convnext_atto", 10)
    branches = build("ofa", student, teacher, 32, 10).branches
    stage1 = [m for m in branches["1"] if isinstance(m, SepConv)]
    assert [(b[0].in_channels, b[5].out_channels) for b in stage1] == [(64, 128), (128, 256), (256, 512)]
    assert sum(p.numel() for p in branches["4"].parameters()) == 512 * 512 + 512 + 512 * 10 + 10


def test_branch_init():
    student, teacher = create_model("swin_pico_patch4_window7_224", 10, img_size=32), create_model("resnet18", 10)
    head = build("ofa", student, teacher, 32, 10).branches["1"].head
    assert abs(head.weight.std().item() - 0.02) < 0.004 and torch.equal(head.bias, torch.zeros(10))


def _train_once(name, model_name, img_size, argv=()):
    torch.manual_seed(0)
    student, teacher = create_model(model_name, 10, img_size=img_size), create_model("convnext_atto", 10)
    distiller = build(name, student, teacher, img_size, 10, *argv).train()
    images = torch.randn(2, 3, img_size, img_size)
    feats = extract_features(student, images, distiller.student_request)
    teacher_feats = Features(logits=torch.randn(2, 10))
    labels = torch.tensor([1, 4])
    losses = distiller.distill_losses(feats, teacher_feats, Batch(images, labels, labels, torch.arange(2)))
    sum(losses.values()).backward()
    return distiller, feats, teacher_feats, losses


@pytest.mark.parametrize("model_name,prefix", [("deit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_deit_students_get_token_branches(model_name, prefix):
    """Class and distillation tokens skip the 14 -> 7 merge, join the ViT blocks; every branch learns."""
    distiller, feats, _, losses = _train_once("ofa", model_name, 224)
    for stage in (1, 2, 3, 4):
        branch = distiller.branches[str(stage)]
        assert branch.prefix_tokens == prefix and feats.stages[stage].shape[1] == prefix + 196
        assert len(branch.entry) == 1  # one merge: 14 x 14 -> 7 x 7
        assert torch.isfinite(losses[f"ofa_stage{stage}"])
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.head.parameters())


@pytest.mark.parametrize("model_name", ["swin_nano_patch4_window7_224", "swin_pico_patch4_window7_224"])
def test_swin_students_at_224(model_name):
    """Swin stages arrive as tokens without prefix: 56, 28, 14, 7 grids merge 3, 2, 1, 0 times; all learn."""
    distiller, _, _, losses = _train_once("ofa", model_name, 224)
    for stage, merges in zip((1, 2, 3, 4), (3, 2, 1, 0)):
        branch = distiller.branches[str(stage)]
        assert branch.prefix_tokens == 0
        assert (len(branch.entry) if merges else 0) == merges
        assert torch.isfinite(losses[f"ofa_stage{stage}"])
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())


def test_token_pooling_uses_class_token_else_mean():
    """With the ViT blocks taken out, the branch is head(class token) with prefix tokens, else head(mean)."""
    torch.manual_seed(0)
    with_cls = TokenBranch(StageInfo(4, "token", "NLC", 2, (2 + 9, 16)), 16, 5)
    no_cls = TokenBranch(StageInfo(4, "token", "NLC", 0, (9, 16)), 16, 5)
    for branch in (with_cls, no_cls):
        branch.blocks = nn.Identity()
    x = torch.randn(3, 11, 16)
    assert torch.allclose(with_cls(x), with_cls.head(x[:, 0]))
    assert torch.allclose(no_cls(x[:, 2:]), no_cls.head(x[:, 2:].mean(dim=1)))


def test_total_is_weighted_sum_of_ofa_terms():
    """ofa = kd_loss_weight * ofa_loss(final logits, eps_last); ofa_stageS = ofa_loss_weight *
    ofa_loss(branch S logits, eps_S)."""
    argv = ("--ofa-stage", "2", "4", "--ofa-eps", "1.2", "1.4", "1.6", "--ofa-loss-weight", "0.3",
            "--kd-loss-weight", "2", "--ofa-temperature", "2")
    distiller, feats, teacher_feats, losses = _train_once("ofa", "resnet18", 32, argv)
    mask = F.one_hot(torch.tensor([1, 4]), 10)
    assert set(losses) == {"ofa", "ofa_stage2", "ofa_stage4"}
    assert torch.allclose(losses["ofa"], 2 * ofa_loss(feats.logits, teacher_feats.logits, mask, 1.6, 2.0))
    with torch.no_grad():
        for stage, eps in ((2, 1.2), (4, 1.4)):
            logits = distiller.branches[str(stage)](feats.stages[stage])
            expected = 0.3 * ofa_loss(logits, teacher_feats.logits, mask, eps, 2.0)
            assert torch.allclose(losses[f"ofa_stage{stage}"], expected, rtol=1e-5)


def test_no_stage_is_logits_only():
    distiller, _, _, losses = _train_once("ofa", "resnet18", 32, ("--ofa-stage",))
    assert set(losses) == {"ofa"} and distiller.extra_parameter_count() == 0
    assert distiller.student_request.stages == ()
