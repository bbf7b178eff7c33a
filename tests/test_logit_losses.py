"""DKD (Zhao et al., CVPR 2022) and DIST (Huang et al., NeurIPS 2022), with the official code's details (DKD's
-1000 mask after dividing by T, DIST's eps 1e-8), against float64 computations of their formulas written out per
sample
and per class, gradients included; the logit distillers' flags and wiring; DKD under mixup through a Batch;
DIST over the global batch under DDP (two gloo processes with B/2 each give the loss of one process with B)."""
import pytest
import torch
from torch import nn

from distillers import DISTILLERS, build_distiller
from distillers.dist import dist_loss
from distillers.dkd import dkd_loss
from distillers.kd import kd_loss
from engine.config import parse_args_with_config
from engine.loader import build_mixup
from engine.loop import make_batch
from engine.train_args import build_train_parser
from kdcore.features import Features

CLASSES = 10


def logits(seed, batch=8, classes=CLASSES, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=generator, dtype=dtype) * scale


def labels_for(seed, batch=8):
    return torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(seed))


def parse(*argv):
    return parse_args_with_config(build_train_parser(DISTILLERS), list(argv))


def build(name, *argv):
    args = parse("--distiller", name, *argv)
    return build_distiller(args, nn.Identity(), num_classes=CLASSES)


def kl(p, q):
    return (p * (p / q).log()).sum()


# ---- DKD -------------------------------------------------------------------------------------------------

def reference_dkd(s, t, labels, alpha, beta, T):
    """Per sample: TCKD = KL of (p_y, 1 - p_y); NCKD = KL of the probabilities renormalised over the other
    classes (the exact conditional, no -1000 mask); T^2 (alpha TCKD + beta NCKD), mean over the batch."""
    total = 0
    for s_i, t_i, y in zip(s.double(), t.double(), labels.tolist()):
        p_s, p_t = torch.softmax(s_i / T, 0), torch.softmax(t_i / T, 0)
        tckd = kl(torch.stack([p_t[y], 1 - p_t[y]]), torch.stack([p_s[y], 1 - p_s[y]]))
        rest = torch.arange(len(s_i)) != y
        nckd = kl(p_t[rest] / p_t[rest].sum(), p_s[rest] / p_s[rest].sum())
        total = total + alpha * tckd + beta * nckd
    return T * T * total / len(s)


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 2.0, 1.0), (0.5, 8.0, 4.0)])
def test_dkd_matches_formula_with_gradients(alpha, beta, T):
    s, t, y = logits(0).requires_grad_(True), logits(1), labels_for(2)
    ours = dkd_loss(s, t, y, alpha, beta, T)
    ref = reference_dkd(s, t, y, alpha, beta, T)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-10)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-14)


def test_dkd_decomposes_kd():
    """The DKD paper's identity, per sample: KD = TCKD + (1 - p_target^teacher) NCKD."""
    s, t, y, T = logits(3), logits(4), labels_for(5), 2.0
    for i in range(len(s)):
        p_target = torch.softmax(t[i] / T, 0)[y[i]].item()
        dkd = dkd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], 1.0, 1 - p_target, T)
        assert torch.allclose(dkd, kd_loss(s[i:i + 1], t[i:i + 1], T), rtol=1e-10)


def test_dkd_confident_logits_stay_finite():
    """A target logit 200 above the rest: 1 - p_target underflows in a plain softmax, not in log space."""
    s, t, y = logits(6, scale=1.0).float(), logits(7, scale=1.0).float(), labels_for(8)
    t[torch.arange(len(t)), y] += 200
    s.requires_grad_(True)
    value = dkd_loss(s, t, y, 1.0, 2.0, 1.0)
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_dkd_mixup_targets_reduce_to_the_dominant_class():
    args = parse("--distiller", "dkd", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "-b", "8")
    batch = make_batch(torch.zeros(8, 3, 8, 8), labels_for(9), torch.arange(8), "cpu", build_mixup(args, CLASSES))
    assert batch.targets.shape == (8, CLASSES)
    dkd = build("dkd")
    s, t = logits(10).float(), logits(11).float()
    loss = dkd.distill_losses(Features(logits=s), Features(logits=t), batch)["dkd"]
    assert torch.allclose(loss.double(), reference_dkd(s, t, batch.targets.argmax(1), 1.0, 2.0, 1.0), rtol=1e-5)


# ---- DIST ------------------------------------------------------------------------------------------------

def pearson(u, v, eps=1e-8):
    """torch.corrcoef's Pearson, with the official DIST code's eps (1e-8) on the product of the centred norms
    (n * biased stds)."""
    norms = len(u) * u.std(unbiased=False) * v.std(unbiased=False)
    return torch.corrcoef(torch.stack([u, v]))[0, 1] * norms / (norms + eps)


def reference_dist(s, t, beta, gamma, tau):
    """Pearson of each sample's (row) and each class's (column) probabilities, from torch.corrcoef."""
    y_s, y_t = torch.softmax(s.double() / tau, 1), torch.softmax(t.double() / tau, 1)
    inter = 1 - torch.stack([pearson(a, b) for a, b in zip(y_s, y_t)]).mean()
    intra = 1 - torch.stack([pearson(a, b) for a, b in zip(y_s.t(), y_t.t())]).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_formula_with_gradients(beta, gamma, tau):
    s, t = logits(12, batch=32).requires_grad_(True), logits(13, batch=32)
    t[:, :5] += s.detach()[:, :5]  # some real correlation
    ours = dist_loss(s, t, beta, gamma, tau)
    ref = reference_dist(s, t, beta, gamma, tau)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-10)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-14)


# ---- all four logit distillers ---------------------------------------------------------------------------

def test_zero_when_student_equals_teacher():
    x = logits(14, batch=16).float()
    assert kd_loss(x, x, 2.0).abs().item() < 1e-6
    assert dkd_loss(x, x, labels_for(15, 16), 1.0, 2.0, 2.0).abs().item() < 1e-6
    assert dist_loss(x, x, 1.0, 1.0, 2.0).abs().item() < 1e-6


def test_fp32_under_bf16_autocast():
    s, t, y = logits(16).to(torch.bfloat16), logits(17).float(), labels_for(18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dkd, dist_value = dkd_loss(s, t, y, 1.0, 2.0, 2.0), dist_loss(s, t, 1.0, 1.0, 2.0)
    assert dkd.dtype == dist_value.dtype == torch.float32
    assert torch.allclose(dkd.double(), reference_dkd(s, t, y, 1.0, 2.0, 2.0), rtol=1e-5)
    assert torch.allclose(dist_value.double(), reference_dist(s, t, 1.0, 1.0, 2.0), rtol=1e-5)


def test_flag_defaults():
    args = parse()
    assert (args.dkd_alpha, args.dkd_beta, args.dkd_temperature) == (1.0, 2.0, 1.0)
    assert (args.dist_beta, args.dist_gamma, args.dist_tau) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("name,argv,expected", [
    ("kd", ["--kd-temperature", "2"], lambda s, t, y: kd_loss(s, t, 2.0)),
    ("bkd", ["--kd-temperature", "2"],
     lambda s, t, y: 4 * nn.functional.binary_cross_entropy_with_logits(s / 2, torch.softmax(t / 2, 1))),
    ("dkd", ["--dkd-alpha", "0.5", "--dkd-beta", "8", "--dkd-temperature", "4"],
     lambda s, t, y: reference_dkd(s, t, y, 0.5, 8.0, 4.0)),
    ("dist", ["--dist-beta", "2", "--dist-gamma", "3", "--dist-tau", "4"],
     lambda s, t, y: reference_dist(s, t, 2.0, 3.0, 4.0)),
])
def test_distiller_wires_its_flags_and_the_kd_loss_weight(name, argv, expected):
    distiller = build(name, *argv, "--kd-loss-weight", "0.5")
    assert distiller.teacher_request.logits and distiller.extra_parameter_count() == 0
    s, t, y = logits(19).float(), logits(20).float(), labels_for(21)
    batch = make_batch(torch.zeros(8, 3, 4, 4), y, torch.arange(8), "cpu")
    (term, value), = distiller.distill_losses(Features(logits=s), Features(logits=t), batch).items()
    assert term == name
    assert torch.allclose(value.double(), 0.5 * expected(s.double(), t.double(), y).double(), rtol=1e-5)


# ---- DIST over the global batch under DDP ----------------------------------------------------------------

GLOBAL_BATCH = 16


def dist_loss_and_grad(rank, world):
    """This process's DIST loss on its B/world slice of a fixed global batch, and its student gradient."""
    s_all, t_all = logits(22, batch=GLOBAL_BATCH, dtype=torch.float32), logits(23, batch=GLOBAL_BATCH)
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    s = s_all[part].clone().requires_grad_(True)
    loss = build("dist").distill_losses(Features(logits=s), Features(logits=t_all[part].float()), None)["dist"]
    loss.backward()
    return {"loss": loss.detach(), "student": s.grad}


def ddp_worker(rank, world):
    return dist_loss_and_grad(rank, world)


@pytest.mark.slow
def test_dist_two_processes_give_the_global_batch_loss(gloo_pair):
    results = gloo_pair.run(ddp_worker)
    single = dist_loss_and_grad(0, 1)
    half = GLOBAL_BATCH // 2
    assert not torch.allclose(dist_loss_and_grad(0, 2)["loss"], single["loss"], rtol=1e-3)  # intra is a batch statistic
    for rank in range(2):
        result = results[rank]
        assert torch.allclose(result["loss"], single["loss"], rtol=1e-6)
        # The all-gather's backward sums the identical per-process gradients; DDP then averages them.
        assert torch.allclose(result["student"], 2 * single["student"][rank * half:(rank + 1) * half],
                              rtol=1e-5, atol=1e-8)
