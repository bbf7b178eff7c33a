"""rsd_loss against an independent computation, via torch.corrcoef, of the RSD loss (ICCV 2025, Eq. 4, as its
official code sums it): sum_i (C_ii - 1)^2 + kappa * sum_{i != j} C_ij^2, C the batch Pearson matrix."""
import pytest
import torch

from distillers.rsd import ArchitectureAgnosticDecoupler, rsd_loss


def reference_rsd(student, teacher, kappa):
    """Pearson matrix between every teacher dim and every student dim from torch.corrcoef, then Eq. (sum).

    corrcoef uses the unbiased covariance and std, whose ratio is the biased one; the official code's
    +1e-5 on the std is the only difference, negligible at the feature scales used here (std >= 10).
    """
    d = teacher.shape[1]
    full = torch.corrcoef(torch.cat([teacher, student], dim=1).t().double())
    pearson = full[:d, d:]
    on_diag = ((torch.diagonal(pearson) - 1) ** 2).sum()
    off_diag = (pearson ** 2).sum() - (torch.diagonal(pearson) ** 2).sum()
    return on_diag + kappa * off_diag


@pytest.mark.parametrize("kappa", [0.01, 0.0, 1.0])
def test_matches_pearson_formula_with_gradients(kappa):
    torch.manual_seed(0)
    student = (torch.randn(64, 24) * 30 + 1).double().requires_grad_(True)
    teacher = (torch.randn(64, 24) * 10 - 2).double()
    teacher[:, :12] += student.detach()[:, :12]  # some real correlation
    ours = rsd_loss(student, teacher, kappa)
    ref = reference_rsd(student, teacher, kappa)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_ref,) = torch.autograd.grad(ref, student)
    assert torch.allclose(g_ours, g_ref, rtol=1e-5, atol=1e-8)


def test_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    s, t = torch.randn(64, 16) * 10, torch.randn(64, 16) * 10
    t[:, :8] += s[:, :8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = rsd_loss(s, t, 0.01)
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), reference_rsd(s, t, 0.01), rtol=1e-5)


def test_kappa_zero_is_diagonal_only():
    torch.manual_seed(1)
    s, t = torch.randn(32, 8) * 10, torch.randn(32, 8) * 10
    pearson = torch.corrcoef(torch.cat([t, s], 1).t())[:8, 8:]
    expected = ((torch.diagonal(pearson) - 1) ** 2).sum()
    assert torch.allclose(rsd_loss(s, t, 0.0), expected, rtol=1e-5)


def test_identical_features_give_zero_loss_at_kappa_zero():
    x = torch.randn(50, 6)
    assert rsd_loss(x, x.clone(), 0.0).item() < 1e-6


def test_loss_is_sum_not_mean():
    """Perfectly anti-correlated dims: each diagonal term is (−1 − 1)^2 = 4, summed over D."""
    x = torch.randn(40, 5)
    assert abs(rsd_loss(x, -x, 0.0).item() - 4 * 5) < 1e-3


@pytest.mark.parametrize("d_s,d_t,gamma,expected", [(512, 768, 2, 1_312_768), (512, 768, 4, 2_625_536)])
def test_aad_parameter_counts(d_s, d_t, gamma, expected):
    """Linear(D_s, g*D_s) + BN(g*D_s) weight and bias + Linear(g*D_s, D_t): the paper's Figure 3 overhead."""
    aad = ArchitectureAgnosticDecoupler(d_s, d_t, gamma)
    by_formula = d_s * gamma * d_s + 2 * gamma * d_s + gamma * d_s * d_t
    assert sum(p.numel() for p in aad.parameters()) == expected == by_formula


def test_aad_init():
    aad = ArchitectureAgnosticDecoupler(64, 32, 2)
    assert not any(m.bias is not None for m in aad if isinstance(m, torch.nn.Linear))
    assert abs(aad[0].weight.std().item() - 0.02) < 0.003
    assert torch.equal(aad[1].weight, torch.ones(128)) and torch.equal(aad[1].bias, torch.zeros(128))
