"""The RSD paper's (ICCV 2025) variants of Tables 3-7, each one flag away: every loss term equals rsd_loss applied to
the right tensors, each variant trains (bf16, mixup), and its statistics are over the global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillers import DISTILLERS, build_distiller
from distillers.rsd import rsd_loss
from engine.config import parse_args_with_config
from engine.models import create_model
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.features import Features, embedding_dim
from kdcore.stages import probe_stages

B, CLASSES = 8, 10


def build(name, student_name, teacher_name, *argv):
    torch.manual_seed(0)
    student, teacher = create_model(student_name, CLASSES, img_size=32), create_model(teacher_name, CLASSES)
    args = parse_args_with_config(build_train_parser(DISTILLERS), ["--distiller", name, *argv])
    return build_distiller(args, student, input_size=32, teacher=teacher, num_classes=CLASSES).train()


def random_features(distiller, seed, teacher_dim=320):
    """Student features shaped as the dry run finds them (grad-carrying), teacher features without grad."""
    g = torch.Generator().manual_seed(seed)
    student = distiller.student
    stages = {s: (torch.randn(B, *info.shape, generator=g) * 3).requires_grad_(True)
              for s, info in probe_stages(student, 32, distiller.student_request.stages).items()}
    s_feats = Features(logits=(torch.randn(B, CLASSES, generator=g) * 3).requires_grad_(True),
                       embedding=(torch.randn(B, embedding_dim(student), generator=g) * 3).requires_grad_(True),
                       stages=stages)
    t_feats = Features(logits=torch.randn(B, CLASSES, generator=g) * 3,
                       embedding=torch.randn(B, teacher_dim, generator=g) * 3)
    t_feats.logits[:, :5] += s_feats.logits.detach()[:, :5]  # some real correlation
    return s_feats, t_feats


def batch(part=slice(None)):
    labels = (torch.arange(B) % CLASSES)[part]
    return Batch(torch.zeros(len(labels), 3, 32, 32), labels, labels, torch.arange(B)[part])


def test_logits_target_is_rsd_on_logits_without_aad():
    """Table 5: lambda * rsd_loss(student logits, teacher logits); nothing extra to train."""
    d = build("rsd", "resnet18", "convnext_atto", "--rsd-target", "logits", "--rsd-kappa", "0.05")
    assert d.extra_parameter_count() == 0
    assert not d.student_request.embedding and d.teacher_request.logits and not d.teacher_request.embedding
    s, t = random_features(d, 0)
    losses = d.distill_losses(s, t, batch())
    assert set(losses) == {"rsd"}
    assert torch.allclose(losses["rsd"], 0.1 * rsd_loss(s.logits, t.logits, 0.05))


@pytest.mark.parametrize("argv,kappa,aad", [((), 0.01, True), (("--rsd-kappa", "0"), 0.0, True),
                                            (("--rsd-no-aad",), 0.01, False)])
def test_embedding_variants(argv, kappa, aad):
    """Default, Table 3 (kappa 0: diagonal only) and Table 4 (no AAD, equal widths: ResNet18 <- ResNet18)."""
    d = build("rsd", "resnet18", "resnet18", *argv)
    s, t = random_features(d, 1, teacher_dim=512)
    expected = rsd_loss(d.aad(s.embedding) if aad else s.embedding, t.embedding, kappa)
    assert torch.allclose(d.distill_losses(s, t, batch())["rsd"], 0.1 * expected)


def test_rsd_inside_ofa():
    """Table 6: every OFA term becomes rsd_loss(branch or final logits, teacher logits), OFA's weights."""
    d = build("ofa", "swin_pico_patch4_window7_224", "convnext_atto", "--ofa-criterion", "rsd", "--ofa-stage", "3",
              "4", "--rsd-kappa", "0.05", "--ofa-loss-weight", "0.5", "--kd-loss-weight", "2")
    s, t = random_features(d, 2)
    losses = d.distill_losses(s, t, batch())
    assert set(losses) == {"ofa", "ofa_stage3", "ofa_stage4"}
    assert torch.allclose(losses["ofa"], 2 * rsd_loss(s.logits, t.logits, 0.05))
    for stage in (3, 4):
        expected = 0.5 * rsd_loss(d.branches[str(stage)](s.stages[stage]), t.logits, 0.05)
        assert torch.allclose(losses[f"ofa_stage{stage}"], expected, rtol=1e-5)


@pytest.mark.parametrize("stages", [("4",), ("3", "4"), ("2", "3", "4"), ("1", "2", "3", "4")])
def test_rsd_plus_ofa_branches(stages):
    """Table 7: lambda * rsd_loss(AAD(embedding), teacher embedding) + per stage lambda * rsd_loss(branch
    logits, teacher logits)."""
    d = build("rsd", "resnet18", "convnext_atto", "--rsd-branch-stage", *stages)
    assert d.student_request.stages == tuple(map(int, stages)) and d.teacher_request.logits
    s, t = random_features(d, 3)
    losses = d.distill_losses(s, t, batch())
    assert set(losses) == {"rsd", *(f"rsd_stage{x}" for x in stages)}
    assert torch.allclose(losses["rsd"], 0.1 * rsd_loss(d.aad(s.embedding), t.embedding, 0.01))
    with torch.no_grad():
        for stage in map(int, stages):
            expected = 0.1 * rsd_loss(d.branches[str(stage)](s.stages[stage]), t.logits, 0.01)
            assert torch.allclose(losses[f"rsd_stage{stage}"], expected, rtol=1e-5)


GLOBAL_BATCH_VARIANTS = (["rsd", "--rsd-target", "logits"], ["rsd", "--rsd-branch-stage", "3", "4"],
                         ["ofa", "--ofa-criterion", "rsd", "--ofa-stage", "3", "4"])


def _leaves(distiller, feats):
    """What the loss is differentiated by: the student features and the distiller's own parameters."""
    return [feats.logits, feats.embedding, *feats.stages.values(), *distiller.extra_parameters()]


def _global_batch_worker(rank, world, port):
    """Each of `world` gloo processes sees B / world samples; the losses, and the gradients once DDP has
    averaged them, must equal the single-process full-batch ones, computed here first, before the group exists."""
    torch.set_num_threads(1)
    cases = []
    for name, *flags in GLOBAL_BATCH_VARIANTS:
        d = build(name, "swin_pico_patch4_window7_224", "convnext_atto", *flags)
        s, t = random_features(d, 4)
        full = d.distill_losses(s, t, batch())
        cases.append((d, s, t, full, torch.autograd.grad(sum(full.values()), _leaves(d, s), allow_unused=True)))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        part = slice(rank * B // world, (rank + 1) * B // world)
        for d, s, t, full, full_grads in cases:
            s_part = Features(s.logits[part], s.embedding[part], {k: v[part] for k, v in s.stages.items()})
            local = d.distill_losses(s_part, Features(t.logits[part], t.embedding[part]), batch(part))
            assert set(local) == set(full)
            for term in full:
                assert torch.allclose(local[term], full[term], rtol=1e-5), (term, local[term], full[term])
            grads = torch.autograd.grad(sum(local.values()), _leaves(d, s), allow_unused=True)
            n_feats = 2 + len(s.stages)
            for i, (g_local, g_full) in enumerate(zip(grads, full_grads)):
                if g_full is None:
                    continue
                if i < n_feats:  # this process's samples: the all-gather's backward sums world copies
                    g_local, g_full = g_local[part], g_full[part]
                else:  # parameters: DDP averages over processes
                    dist.all_reduce(g_local)
                # bias gradients of a batch-standardised loss are ~0: fp32 noise of ~1e-6 there
                assert torch.allclose(g_local / world, g_full, rtol=1e-4, atol=1e-5), (d.name, i)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_variants_use_the_global_batch_under_ddp():
    """RSD statistics of the logits, branch and in-OFA variants come from the all-gathered batch, so two
    processes with B/2 each match one with B."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_global_batch_worker, args=(2, port), nprocs=2)
