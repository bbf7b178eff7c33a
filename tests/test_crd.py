"""CRD (distillers/crd.py) against independent computations: the NCE formula written out in float64, negatives
checked class by class, the bank update row by row, Z from gathered bank rows, and one process against two."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillers import DISTILLERS, build_distiller
from distillers.contrastive import class_blocks, crd_loss, draw_negatives, momentum_update, negatives_generator
from engine.config import parse_args_with_config
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.errors import UserError
from kdcore.features import Features

D_S, D_T, K, N_DATA, N_CLASSES = 12, 20, 40, 30, 3
LABELS = torch.arange(N_DATA) * 7 % N_CLASSES


def reference_nce(scores, z, num_data, temperature, eps=1e-7):
    """The reference's contrast loss, written out: P = exp(s / T) / Z, noise mass m * Pn with Pn = 1 / N."""
    scores = scores.double()
    m, pn = scores.shape[1] - 1, 1.0 / num_data
    p = torch.exp(scores / temperature) / z
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + m * pn + eps))
    log_d0 = torch.log((m * pn) / (p[:, 1:] + m * pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


@pytest.mark.parametrize("k,num_data,temperature", [(40, 30, 0.07), (5, 1000, 0.07), (16, 50, 0.5)])
def test_crd_loss_matches_nce_formula_with_gradients(k, num_data, temperature):
    torch.manual_seed(0)
    s = (torch.rand(6, 1 + k, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    t = (torch.rand(6, 1 + k, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    z = torch.tensor([3.0e4, 7.0e3], dtype=torch.float64)
    ours = crd_loss(s, t, z, num_data, temperature)
    ref = reference_nce(s, z[0], num_data, temperature) + reference_nce(t, z[1], num_data, temperature)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(ours, (s, t)), torch.autograd.grad(ref, (s, t))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_crd_loss_known_value():
    """K = 1, N = 2: noise mass 1/2; scores giving h = 1/2 make every term log(1/2): 2 log 2 per anchor."""
    temperature, z = 0.1, 8.0
    scores = torch.full((3, 2), temperature * math.log(0.5 * z), dtype=torch.float64)
    assert abs(crd_loss(scores, scores, (z, z), 2, temperature, eps=0.0).item() - 4 * math.log(2)) < 1e-12


def test_crd_loss_is_fp32_under_bf16_autocast():
    torch.manual_seed(1)
    s, t = torch.rand(4, 9) * 2 - 1, torch.rand(4, 9) * 2 - 1
    z = torch.tensor([500.0, 900.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = crd_loss(s.bfloat16().float(), t, z, 100, 0.07)
    ref = reference_nce(s.bfloat16().float(), 500.0, 100, 0.07) + reference_nce(t, 900.0, 100, 0.07)
    assert value.dtype == torch.float32 and torch.allclose(value.double(), ref, rtol=1e-5)


def test_negatives_are_other_classes_uniformly_with_replacement():
    labels = torch.tensor([2, 0, 0, 1, 2, 2, 0, 2, 2, 2, 1, 0])  # unequal classes: 4 x 0, 2 x 1, 6 x 2
    classes = torch.tensor([0, 1, 2, 1])
    k = 6000  # far more than any class's 6 to 10 other samples: drawn with replacement
    negatives = draw_negatives(classes, k, *class_blocks(labels), negatives_generator(0, 0, "cpu"))
    assert negatives.shape == (4, k)
    for row, c in zip(negatives, classes):
        others = (labels != c).nonzero().flatten()
        assert not (labels[row] == c).any()
        counts = torch.bincount(row, minlength=len(labels))[others].double()
        assert counts.min() > 0.8 * k / len(others) and counts.max() < 1.2 * k / len(others)


def test_negatives_depend_only_on_seed_and_step():
    blocks = class_blocks(LABELS)
    classes = LABELS[torch.tensor([4, 9, 17, 28, 0, 3])]

    def draw(seed, step, rows=classes):
        return draw_negatives(rows, K, *blocks, negatives_generator(seed, step, "cpu"))

    assert torch.equal(draw(42, 5), draw(42, 5))
    assert not torch.equal(draw(42, 5), draw(42, 6)) and not torch.equal(draw(42, 5), draw(43, 5))


def test_momentum_update_matches_row_by_row_computation():
    torch.manual_seed(2)
    bank = F.normalize(torch.randn(10, 4, dtype=torch.float64), dim=1)
    index = torch.tensor([7, 2, 7, 5])  # 7 twice: its last feature wins
    feats = F.normalize(torch.randn(4, 4, dtype=torch.float64), dim=1)
    expected = bank.clone()
    for i, f in ((2, feats[1]), (7, feats[2]), (5, feats[3])):
        mixed = 0.3 * bank[i] + 0.7 * f
        expected[i] = mixed / math.sqrt(sum(v * v for v in mixed.tolist()))
    momentum_update(bank, index, feats, 0.3)
    assert torch.allclose(bank, expected, rtol=0, atol=1e-12)


class Stub(nn.Linear):
    """A stand-in model: only its width (num_features) is read; features are passed in directly."""

    def __init__(self, width):
        super().__init__(width, 2)
        self.num_features = width


def make_args(*flags):
    return parse_args_with_config(build_train_parser(DISTILLERS),
                                  ["--distiller", "crd", "--crd-k", str(K), "--crd-feat-dim", "8", *flags])


def make_crd(labels=LABELS, args=None, world_size=1):
    torch.manual_seed(0)
    return build_distiller(args or make_args(), Stub(D_S), teacher=Stub(D_T),
                           dataset_size=N_DATA if labels is None else len(labels), train_labels=labels,
                           world_size=world_size)


def global_batch(step, size=8):
    generator = torch.Generator().manual_seed(100 + step)
    index = torch.randperm(N_DATA, generator=generator)[:size]
    return index, torch.randn(size, D_S, generator=generator), torch.randn(size, D_T, generator=generator)


def crd_step(crd, index, emb_s, emb_t):
    batch = Batch(images=torch.zeros(len(index), 1), targets=LABELS[index], labels=LABELS[index], index=index)
    return crd.distill_losses(Features(embedding=emb_s), Features(embedding=emb_t), batch)["crd"]


def test_z_is_estimated_from_the_first_batch_then_frozen():
    crd = make_crd(args=make_args("--kd-loss-weight", "0.8"))
    bank_s, bank_t = crd.contrast.memory_student.double(), crd.contrast.memory_teacher.double()
    index, emb_s, emb_t = global_batch(0)
    loss = crd_step(crd, index, emb_s, emb_t)
    # Independently: the anchors, the contrast rows gathered from the banks as they were, the reference's Z.
    head_s, head_t = crd.contrast.embed_s.linear, crd.contrast.embed_t.linear
    f_s = F.normalize(emb_s.double() @ head_s.weight.double().t() + head_s.bias.double())
    f_t = F.normalize(emb_t.double() @ head_t.weight.double().t() + head_t.bias.double())
    negatives = draw_negatives(LABELS[index], K, *class_blocks(LABELS), negatives_generator(42, 0, "cpu"))
    contrast = torch.cat([index[:, None], negatives], dim=1)
    s_scores = torch.einsum("bkd,bd->bk", bank_t[contrast], f_s)
    t_scores = torch.einsum("bkd,bd->bk", bank_s[contrast], f_t)
    z = torch.stack([torch.exp(s / 0.07).mean() * N_DATA for s in (s_scores, t_scores)])
    assert torch.allclose(crd.contrast.z.double(), z, rtol=1e-5)
    expected = 0.8 * (reference_nce(s_scores, z[0], N_DATA, 0.07) + reference_nce(t_scores, z[1], N_DATA, 0.07))
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    frozen = crd.contrast.z.clone()
    crd_step(crd, *global_batch(1))
    assert torch.equal(crd.contrast.z, frozen) and int(crd.contrast.step) == 2


def test_banks_start_uniform_in_plus_minus_stdv():
    crd = make_crd(labels=torch.arange(20000) % 4)
    stdv = 1 / math.sqrt(8 / 3)
    for bank in (crd.contrast.memory_student, crd.contrast.memory_teacher):
        assert bank.shape == (20000, 8) and bank.abs().max() <= stdv
        assert abs(bank.mean().item()) < 0.01 and abs(bank.var().item() - stdv ** 2 / 3) < 0.01
    assert not torch.equal(crd.contrast.memory_student, crd.contrast.memory_teacher)


def test_extra_parameters_are_the_two_heads():
    args = make_args("--crd-feat-dim", "128")
    crd = build_distiller(args, Stub(512), teacher=Stub(768), dataset_size=N_DATA, train_labels=LABELS)
    assert crd.extra_parameter_count() == (512 + 1) * 128 + (768 + 1) * 128 == 164_096


def test_banks_z_and_step_are_checkpointed_with_the_distiller_and_resume_exactly():
    crd = make_crd()
    crd_step(crd, *global_batch(0))
    state = crd.extra_state_dict()
    assert {"contrast.memory_student", "contrast.memory_teacher", "contrast.z", "contrast.step"} <= set(state)
    assert not {"sample_class", "by_class", "class_start", "class_count"} & set(state)  # derived, not saved
    assert not any("memory" in k for k in crd.student.state_dict())
    resumed = make_crd()
    resumed.load_extra_state_dict(state)
    batch = global_batch(1)
    assert torch.equal(crd_step(resumed, *batch), crd_step(crd, *batch))
    assert torch.equal(resumed.contrast.memory_student, crd.contrast.memory_student)
    assert torch.equal(resumed.contrast.z, crd.contrast.z)


def test_refuses_a_single_class_dataset_and_missing_labels():
    with pytest.raises(UserError, match="at least two classes"):
        make_crd(labels=torch.zeros(N_DATA, dtype=torch.int64))
    with pytest.raises(UserError, match="train_labels"):
        make_crd(labels=None)


def _steps(crd, rank, world_size):
    """Two steps on this process's share of the global batches: losses, the heads' gradients, the state."""
    losses, grads = [], []
    for step in range(2):
        index, emb_s, emb_t = global_batch(step)
        rows = slice(rank * len(index) // world_size, (rank + 1) * len(index) // world_size)
        loss = crd_step(crd, index[rows], emb_s[rows], emb_t[rows])
        losses.append(loss.detach())
        grads.append([g.detach() for g in torch.autograd.grad(loss, list(crd.extra_parameters()))])
    state = {k: v.clone() for k, v in crd.extra_state_dict().items() if k in ("contrast.memory_student",
                                                                               "contrast.memory_teacher", "contrast.z",
                                                                               "contrast.step")}
    return {"losses": losses, "grads": grads, "state": state}


def _rank(rank, world_size):
    return _steps(make_crd(world_size=world_size), rank, world_size)


@pytest.mark.slow
def test_two_processes_give_the_one_process_loss_gradients_and_banks(gloo_pair):
    """Same negatives, Z and bank updates on every process, so the mean of the two processes' losses and
    gradients (what DDP averages) equals one process on the whole batch, and both hold the same banks."""
    single = _steps(make_crd(), 0, 1)
    ranks = gloo_pair.run(_rank)
    for step in range(2):
        assert torch.allclose((ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2, single["losses"][step],
                              rtol=1e-5)
        for g0, g1, g in zip(ranks[0]["grads"][step], ranks[1]["grads"][step], single["grads"][step]):
            assert torch.allclose((g0 + g1) / 2, g, rtol=1e-4, atol=1e-6)
    for name, value in single["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        assert torch.allclose(ranks[0]["state"][name].double(), value.double(), rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
def test_crd_on_fashion_mnist(tmp_path, fashion_mnist):
    """CRD on the real training set: banks over all 60,000 images, negatives from the other 9 classes, a few
    steps of train.py's own run (built by its build steps) with the shipped demo teacher."""
    from distillers import DISTILLERS
    from engine.config import parse_args_with_config
    from engine.loop import train_step
    from engine.run import build_run
    from engine.train_args import build_train_parser
    args = parse_args_with_config(build_train_parser(DISTILLERS), [
        "-c", "configs/demo/rsd.yaml", "--train-subset", "0", "--distiller", "crd", "-b", "64", "--workers", "0",
        "--no-eval-teacher",
        "--output", str(tmp_path), "--experiment", "crd"])
    run = build_run(args)
    crd = run.distiller
    assert crd.contrast.memory_student.shape == crd.contrast.memory_teacher.shape == (60000, 128)
    start = crd.contrast.memory_student.clone()
    loader = iter(run.data.train_loader)
    run.model.train()
    for _ in range(3):
        batch = run.batches(next(loader))
        loss, losses = train_step(run.model, run.teacher, run.optimizer, batch, autocast=run.autocast,
                                  sources=run.sources)
        assert torch.isfinite(loss) and losses["crd"] > 0
        assert not torch.equal(crd.contrast.memory_student[batch.index], start[batch.index])
    assert int(crd.contrast.step) == 3
