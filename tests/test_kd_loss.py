"""KD (Hinton et al., 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean) and BKD (the OFA-KD/RSD code's
BCE-with-logits of the student logits against the teacher's softmax) against float64 computations of their
formulas, gradients included."""
import pytest
import torch

from distillers.kd import bkd_loss, kd_loss


def logits(seed, batch=8, classes=10, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale


def reference_kd(s, t, T):
    p_t = torch.softmax(t / T, 1)
    return (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T


def reference_bkd(s, t, T):
    """Per-element binary cross-entropy written out with the sigmoid, averaged over batch and classes."""
    q = torch.sigmoid(s / T)
    p = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    return -(p * q.log() + (1 - p) * (1 - q).log()).mean() * T * T


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_definition_with_gradients(T):
    s, t = logits(0).requires_grad_(True), logits(1)
    ours = kd_loss(s, t, T)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, reference_kd(s, t, T), rtol=1e-10)
    (grad,) = torch.autograd.grad(ours, s)
    # d/ds of T^2 KL(p_t || p_s) with p = softmax(./T), batch mean: T (p_s - p_t) / B
    expected = T * (torch.softmax(s / T, 1) - torch.softmax(t / T, 1)) / s.shape[0]
    assert torch.allclose(grad, expected, rtol=1e-8, atol=1e-12)


def test_kd_zero_when_equal():
    x = torch.randn(4, 7)
    assert kd_loss(x, x, 2.0).abs().item() < 1e-6


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_bkd_matches_definition_with_gradients(T):
    s, t = logits(2).requires_grad_(True), logits(3)
    ours = bkd_loss(s, t, T)
    assert ours.dtype == torch.float64
    ref = reference_bkd(s, t, T)
    assert torch.allclose(ours, ref, rtol=1e-10)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-14)
    # the BCE-with-logits gradient: T (sigmoid(s/T) - p_t) / (B C)
    expected = T * (torch.sigmoid(s / T) - torch.softmax(t / T, 1)) / s.numel()
    assert torch.allclose(g_ours, expected, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_bkd_minimum_is_at_the_teacher_probabilities_logit(T):
    t = logits(4)
    p_t = torch.softmax(t / T, 1)
    best = (T * torch.logit(p_t)).requires_grad_(True)
    value = bkd_loss(best, t, T)
    (grad,) = torch.autograd.grad(value, best)
    assert grad.abs().max().item() < 1e-12
    for seed in range(3):
        nudge = 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype)
        assert bkd_loss(best.detach() + nudge, t, T) > value


def test_fp32_under_bf16_autocast():
    s, t = logits(5).to(torch.bfloat16), logits(6).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kd, bkd = kd_loss(s, t, 2.0), bkd_loss(s, t, 2.0)
    assert kd.dtype == bkd.dtype == torch.float32
    assert torch.allclose(kd.double(), reference_kd(s.double(), t.double(), 2.0), rtol=1e-5)
    assert torch.allclose(bkd.double(), reference_bkd(s.double(), t.double(), 2.0), rtol=1e-5)

