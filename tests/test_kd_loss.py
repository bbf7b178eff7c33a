import torch

from distillers.kd import kd_loss


def test_kd_matches_definition():
    torch.manual_seed(0)
    s, t, T = torch.randn(8, 10), torch.randn(8, 10), 4.0
    p_t = torch.softmax(t / T, 1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(kd_loss(s, t, T), expected, rtol=1e-5)


def test_kd_zero_when_equal():
    x = torch.randn(4, 7)
    assert kd_loss(x, x, 2.0).abs().item() < 1e-6
