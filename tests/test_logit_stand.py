"""Logit standardisation (Sun et al., CVPR 2024) in KD, BKD, DKD and RichKD's (L) term: the losses against float64
computations of the formula written out (z-score per sample with the unbiased std plus 1e-7, both sides, before
the temperature), gradients by finite differences; the flag's readers and refusals; the shipped CIFAR-100 setting;
two training steps on a BatchNorm CNN under bf16 with mixup and on a DeiT in fp32 with mixup."""
import glob
import os
import re

import pytest
import torch
from conftest import REPO
from test_distiller_matrix import run_two_steps
from test_kd_loss import reference_bkd, reference_kd
from test_logit_losses import build, labels_for, logits, parse, reference_dkd
from test_richkd import reference_logit_term
from torch import nn

from distillers import DISTILLERS
from distillers.dkd import dkd_loss
from distillers.kd import bkd_loss, kd_loss
from distillers.richkd import richkd_loss
from engine.config import parse_args_with_config
from engine.loop import make_batch
from engine.train_args import build_train_parser
from kdcore.errors import UserError
from kdcore.features import Features

TEMPERATURES = [1.0, 2.0, 4.0]
LS_CONFIG = os.path.join(REPO, "configs", "logit_stand", "cifar100_swin_tiny-resnet18.yaml")


def z_score(z):
    """Row by row: (z - mean) / (sqrt(sum (z - mean)^2 / (C - 1)) + 1e-7), written out."""
    classes = z.shape[1]
    mean = z.sum(dim=1, keepdim=True) / classes
    std = (((z - mean) ** 2).sum(dim=1, keepdim=True) / (classes - 1)).sqrt()
    return (z - mean) / (std + 1e-7)


def shifted_and_scaled(z, seed):
    """Each row of z scaled by a positive factor in [0.2, 5] and shifted by up to +-10: Z leaves it unchanged."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(z.shape[0], 1, dtype=z.dtype).uniform_(-1.6, 1.6, generator=generator))
    shift = torch.empty(z.shape[0], 1, dtype=z.dtype).uniform_(-10, 10, generator=generator)
    return z * scale + shift


LOSSES = {  # name -> (our loss with logit_stand, its reference on already standardised logits)
    "kd": (lambda s, t, y, T: kd_loss(s, t, T, True), lambda s, t, y, T: reference_kd(s, t, T)),
    "bkd": (lambda s, t, y, T: bkd_loss(s, t, T, True), lambda s, t, y, T: reference_bkd(s, t, T)),
    "dkd": (lambda s, t, y, T: dkd_loss(s, t, y, 1.0, 8.0, T, True),
            lambda s, t, y, T: reference_dkd(s, t, y, 1.0, 8.0, T)),
}


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("name", LOSSES)
def test_standardised_loss_matches_float64_formula_with_gradients(name, T):
    ours, reference = LOSSES[name]
    s, t, y = logits(30, scale=5.0).requires_grad_(True), logits(31, scale=2.0), labels_for(32)
    value = ours(s, t, y, T)
    assert value.dtype == torch.float64
    expected = reference(z_score(s), z_score(t), y, T)
    assert torch.allclose(value, expected, rtol=1e-10), (value.item(), expected.item())
    (grad,) = torch.autograd.grad(value, s)
    (grad_expected,) = torch.autograd.grad(expected, s)
    assert torch.allclose(grad, grad_expected, rtol=1e-8, atol=1e-13)
    # through the student's mean and std, checked against finite differences (not autograd)
    assert torch.autograd.gradcheck(lambda x: ours(x, t, y, T), (s.detach().clone().requires_grad_(True),))
    # the standardised logits ignore each row's shift and positive scale; the raw loss does not
    moved_s, moved_t = shifted_and_scaled(s.detach(), 33), shifted_and_scaled(t, 34)
    assert torch.allclose(ours(moved_s, moved_t, y, T), value, rtol=1e-6)


@pytest.mark.parametrize("T", [2.0, 3.0])
def test_richkd_logit_term_standardises_the_student_and_the_fused_logits(T):
    s, t, c = logits(35, scale=4.0).requires_grad_(True), logits(36), logits(37, scale=20.0)
    value = richkd_loss(s, t, c, 0.7, T, True)
    expected = reference_kd(z_score(s), z_score(0.7 * t + 0.3 * c), T)
    assert torch.allclose(value, expected, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda x: richkd_loss(x, t, c, 0.7, T, True),
                                    (s.detach().clone().requires_grad_(True),))
    assert not torch.allclose(value, reference_logit_term(s, t, c, 0.7, T), rtol=1e-3)


def test_off_by_default_and_the_raw_losses_unchanged():
    s, t, y = logits(38), logits(39), labels_for(40)
    assert not parse().logit_stand
    assert torch.allclose(kd_loss(s, t, 2.0), reference_kd(s, t, 2.0), rtol=1e-10)
    assert torch.allclose(bkd_loss(s, t, 2.0), reference_bkd(s, t, 2.0), rtol=1e-10)
    assert torch.allclose(dkd_loss(s, t, y, 1.0, 2.0, 2.0), reference_dkd(s, t, y, 1.0, 2.0, 2.0), rtol=1e-10)
    assert not torch.allclose(kd_loss(s, t, 2.0, True), kd_loss(s, t, 2.0), rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_under_autocast_and_constant_rows(dtype):
    """Low-precision logits are standardised in fp32 (1e-7 is below fp16's normal range). A row of equal logits,
    as a zero-initialised head gives, maps to zeros, and its gradient is scaled by 1 / 1e-7: finite in fp32 and
    bf16, beyond fp16's range (65504) once cast back to fp16 logits (the README's caveat)."""
    s, t = logits(41).to(dtype), logits(42).to(dtype)
    s[0] = 0.0
    s = s.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        value = kd_loss(s, t, 2.0, True)
    assert value.dtype == torch.float32
    expected = reference_kd(z_score(s.detach().double()), z_score(t.double()), 2.0)
    assert torch.allclose(value.double(), expected, rtol=1e-5)
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(grad[1:].float()).all()
    assert grad[0].float().abs().max() > 1e4 and torch.isfinite(grad[0].float()).all() == (dtype == torch.bfloat16)


@pytest.mark.parametrize("name,term", [("kd", "kd"), ("bkd", "bkd"), ("dkd", "dkd")])
def test_the_distillers_read_the_flag(name, term):
    own = ["--dkd-temperature", "2", "--dkd-beta", "8"] if name == "dkd" else ["--kd-temperature", "2"]
    distiller = build(name, "--logit-stand", *own, "--kd-loss-weight", "9")
    s, t, y = logits(43).float(), logits(44).float(), labels_for(45)
    batch = make_batch(torch.zeros(8, 3, 4, 4), y, torch.arange(8), "cpu")
    (got_term, value), = distiller.distill_losses(Features(logits=s), Features(logits=t), batch).items()
    assert got_term == term
    expected = LOSSES[name][1](z_score(s.double()), z_score(t.double()), y, 2.0)
    assert torch.allclose(value.double(), 9 * expected, rtol=1e-5)


def test_its_help_names_the_readers_and_the_others_refuse_it():
    actions = {a.dest: a for a in build_train_parser(DISTILLERS)._actions}
    readers = sorted(re.search(r"read by (.*), refused by the others", actions["logit_stand"].help)[1].split(", "))
    expected = sorted(name for name, cls in DISTILLERS.items() if "logit_stand" in cls.shared_flags)
    assert readers == expected == ["bkd", "dkd", "kd", "richkd"]
    for other in ("dist", "rsd", "ofa", "vanilla", "fitnet", "crd"):
        with pytest.raises(UserError, match=rf"--distiller {other} does not read it"):
            build(other, "--logit-stand", "--teacher", "resnet18")


def test_richkd_without_its_logit_term_refuses_it():
    from distillers.factory import build_distiller
    from kdcore.stages import OutputInfo
    args = parse("--distiller", "richkd", "--richkd-mode", "F", "--logit-stand")
    info = OutputInfo(embedding_width=8)
    with pytest.raises(UserError, match="--richkd-mode F"):
        build_distiller(args, nn.Identity(), teacher=info, sources={"second_source": info}, num_classes=10,
                        dataset_size=16, train_labels=torch.arange(16) % 10)


def test_the_shipped_cifar100_setting():
    """The official CIFAR-100 KD setting on a paper preset: T 2, KD weight 9, CE 0.1; DKD takes T 2 too."""
    args = parse_args_with_config(build_train_parser(DISTILLERS), ["-c", LS_CONFIG])
    assert (args.distiller, args.logit_stand) == ("kd", True)
    assert (args.kd_temperature, args.kd_loss_weight, args.gt_loss_weight) == (2.0, 9.0, 0.1)
    assert (args.model, args.teacher, args.dataset, args.epochs) == ("resnet18", "swin_tiny_patch4_window7_224",
                                                                     "cifar100", 300)  # from the preset
    dkd = parse_args_with_config(build_train_parser(DISTILLERS), ["-c", LS_CONFIG, "--distiller", "dkd"])
    assert (dkd.dkd_temperature, dkd.kd_loss_weight, dkd.logit_stand) == (2.0, 9.0, True)


@pytest.mark.slow
@pytest.mark.parametrize("student, bf16", [("resnet18", True), ("deit_tiny_patch16_224", False)],
                         ids=["resnet18-bf16", "deit_tiny-fp32"])
def test_logit_stand_kd_trains_with_mixup(student, bf16):
    """Two steps of the distiller matrix (finite losses, the precision really used), with mixup/cutmix: a BatchNorm
    CNN student under bf16, a DeiT in fp32."""
    losses = run_two_steps("kd", student, "convnext_atto", True, bf16,
                           ["--logit-stand", "--kd-temperature", "2", "--kd-loss-weight", "9"])
    assert set(losses) == {"ce", "kd"}


FOUR_FLAGS = ["--logit-stand", "--kd-temperature", "2", "--kd-loss-weight", "9", "--gt-loss-weight", "0.1"]


def test_the_readmes_four_flags_apply_on_every_cifar100_preset():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert " ".join(FOUR_FLAGS) in readme
    presets = sorted(glob.glob(os.path.join(REPO, "configs", "presets", "cifar100", "*.yaml")))
    assert len(presets) == 12
    for preset in presets:
        args = parse_args_with_config(build_train_parser(DISTILLERS), ["-c", preset, "--distiller", "kd", *FOUR_FLAGS])
        assert (args.logit_stand, args.kd_temperature, args.kd_loss_weight, args.gt_loss_weight) == (True, 2, 9, 0.1)
