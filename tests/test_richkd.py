"""RichKD (distillers/richkd.py) against independent float64 computations: the fusion, the (L) term and the (F) term
(CRD against the fused embedding) with gradients; cached rows mixed like the images; the start-up errors; a live
source's input remapping. Training runs on Fashion-MNIST (every mode, cache and live, kill and resume) are in
test_richkd_fmnist.py."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillers import DISTILLERS, build_distiller
from distillers.contrastive import class_blocks, draw_negatives, negatives_generator
from distillers.richkd import SECOND_SOURCE, fuse, fused_embedding, richkd_loss
from engine.cache import CacheWriter, dataset_identity
from engine.config import parse_args_with_config
from engine.sources import build_extra_sources
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.errors import UserError
from kdcore.features import Features

D_S, D_T, D_C, K, N_DATA, N_CLASSES, FEAT = 12, 20, 16, 40, 30, 3, 8
LABELS = torch.arange(N_DATA) * 7 % N_CLASSES


def unit(x):
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def softmax(x):
    e = torch.exp(x - x.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def reference_logit_term(s, t, c, alpha, temperature):
    """T^2 * mean_b sum_k p_F (log p_F - log p_S), p = softmax(z / T), z_F = alpha z_T + (1 - alpha) z_C; fp64."""
    p_f = softmax((alpha * t.double() + (1 - alpha) * c.double()) / temperature)
    p_s = softmax(s.double() / temperature)
    return temperature ** 2 * (p_f * (p_f.log() - p_s.log())).sum(dim=1).mean()


def reference_nce(scores, z, num_data, temperature, eps=1e-7):
    m = scores.shape[1] - 1
    p = torch.exp(scores / temperature) / z
    return -(torch.log(p[:, 0] / (p[:, 0] + m / num_data + eps)).sum()
             + torch.log((m / num_data) / (p[:, 1:] + m / num_data + eps)).sum()) / scores.shape[0]


def test_fusion_matches_float64():
    torch.manual_seed(0)
    t, c = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(fuse(t, c, 0.7), torch.stack([0.7 * t[i] + 0.3 * c[i] for i in range(5)]), rtol=1e-12)
    f_t, f_c = unit(t), unit(c)
    expected = []
    for i in range(5):
        mixed = [0.7 * a + 0.3 * b for a, b in zip(f_t[i].tolist(), f_c[i].tolist())]
        norm = math.sqrt(sum(v * v for v in mixed))
        expected.append([v / norm for v in mixed])
    assert torch.allclose(fused_embedding(f_t, f_c, 0.7), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("alpha,temperature", [(0.7, 3.0), (0.25, 1.0), (1.0, 4.0)])
def test_logit_term_matches_float64_with_gradients(alpha, temperature):
    torch.manual_seed(1)
    s, t, c = (torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours, ref = richkd_loss(s, t, c, alpha, temperature), reference_logit_term(s, t, c, alpha, temperature)
    assert ours.dtype == torch.float64 and torch.allclose(ours, ref, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(ours, (s, t, c)), torch.autograd.grad(ref, (s, t, c))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_logit_term_is_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    s, t, c = torch.randn(4, 10).bfloat16(), torch.randn(4, 10), torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = richkd_loss(s, t, c, 0.7, 3.0)
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), reference_logit_term(s.float(), t, c, 0.7, 3.0), rtol=1e-5)


class Stub(nn.Linear):
    """A stand-in model: only its width (num_features) is read; features are passed in directly."""

    def __init__(self, width):
        super().__init__(width, 2)
        self.num_features = width


def write_cache(folder, labels=LABELS, seed=3):
    generator = torch.Generator().manual_seed(seed)
    writer = CacheWriter(folder, dataset_identity(labels, ["a", "b", "c"]), {"name": "test"},
                         {"logits": N_CLASSES, "embedding": D_C})
    writer.write({"logits": torch.randn(len(labels), N_CLASSES, generator=generator),
                  "embedding": torch.randn(len(labels), D_C, generator=generator)})
    return writer.finish()


def richkd_args(*flags):
    return parse_args_with_config(build_train_parser(DISTILLERS), ["--distiller", "richkd", "--crd-k", str(K),
                                                                   "--crd-feat-dim", str(FEAT), *flags])


def make_richkd(args, labels=LABELS):
    """(RichKD, its second source), the source built by the engine from the flags, as train.py builds them."""
    torch.manual_seed(0)
    data_config = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "input_size": (3, 32, 32)}
    args.num_classes = N_CLASSES
    sources = build_extra_sources(args, DISTILLERS["richkd"], labels, data_config, "cpu")
    richkd = build_distiller(args, Stub(D_S), teacher=Stub(D_T), sources=sources, dataset_size=len(labels),
                             train_labels=labels)
    return richkd, sources[SECOND_SOURCE]


def step_losses(richkd, source, student, teacher, batch):
    """The distiller's losses of one step, the source's features computed as the loop computes them."""
    return richkd.distill_losses(student, teacher, batch, **{SECOND_SOURCE: source(batch)})


def fixed_step(index, lam=1.0):
    generator = torch.Generator().manual_seed(7)
    emb_s, emb_t = torch.randn(len(index), D_S, generator=generator), torch.randn(len(index), D_T, generator=generator)
    logits_s, logits_t = (torch.randn(len(index), N_CLASSES, generator=generator) for _ in range(2))
    batch = Batch(images=torch.zeros(len(index), 1), targets=LABELS[index], labels=LABELS[index], index=index, lam=lam,
                  partner_index=None if isinstance(lam, float) and lam == 1.0 else index.flip(0))
    return Features(logits=logits_s.requires_grad_(True), embedding=emb_s), Features(logits_t, emb_t), batch


def test_feature_and_logit_terms_match_an_independent_float64_computation(tmp_path):
    cache = write_cache(tmp_path / "cache")
    rows = {k: torch.from_numpy(np.load(f"{cache}/{k}.npy")[0]).double() for k in ("logits", "embedding")}
    richkd, source = make_richkd(richkd_args("--richkd-cache", cache))
    index = torch.tensor([4, 9, 17, 28, 0, 3, 22, 11])
    student, teacher, batch = fixed_step(index)
    bank_s, bank_t = richkd.contrast.memory_student.double().clone(), richkd.contrast.memory_teacher.double().clone()
    losses = step_losses(richkd, source, student, teacher, batch)
    assert set(losses) == {"richkd_logit", "richkd_feat"}

    heads = {"s": richkd.contrast.embed_s.linear, "t": richkd.contrast.embed_t.teacher.linear,
             "c": richkd.contrast.embed_t.source.linear}
    params = {k: (m.weight.detach().double().requires_grad_(True), m.bias.detach().double().requires_grad_(True))
              for k, m in heads.items()}
    f_s = unit(student.embedding.double() @ params["s"][0].t() + params["s"][1])
    f_t = unit(teacher.embedding.double() @ params["t"][0].t() + params["t"][1])
    f_c = unit(rows["embedding"][index] @ params["c"][0].t() + params["c"][1])
    fused = unit(0.7 * f_t + 0.3 * f_c)
    negatives = draw_negatives(LABELS[index], K, *class_blocks(LABELS), negatives_generator(42, 0, "cpu"))
    contrast = torch.cat([index[:, None], negatives], dim=1)
    s_scores = torch.einsum("bkd,bd->bk", bank_t[contrast], f_s)
    t_scores = torch.einsum("bkd,bd->bk", bank_s[contrast], fused)
    z = [(torch.exp(s.detach() / 0.07).mean() * N_DATA) for s in (s_scores, t_scores)]
    expected_feat = 0.8 * (reference_nce(s_scores, z[0], N_DATA, 0.07) + reference_nce(t_scores, z[1], N_DATA, 0.07))
    assert torch.allclose(losses["richkd_feat"].double(), expected_feat, rtol=1e-5)
    ours = torch.autograd.grad(losses["richkd_feat"], [p for k in "stc" for p in (heads[k].weight, heads[k].bias)])
    ref = torch.autograd.grad(expected_feat, [p for k in "stc" for p in params[k]])
    for a, b in zip(ours, ref):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6)
    # the teacher bank moves towards the fused embedding (CRD's update, momentum 0.5)
    moved_bank = unit(0.5 * bank_t[index] + 0.5 * fused.detach())
    assert torch.allclose(richkd.contrast.memory_teacher[index].double(), moved_bank, atol=1e-6)

    expected_logit = 3.0 * reference_logit_term(student.logits, teacher.logits, rows["logits"][index], 0.7, 3.0)
    assert torch.allclose(losses["richkd_logit"].double(), expected_logit, rtol=1e-6)
    s = student.logits.detach().double().requires_grad_(True)
    ref_grad, = torch.autograd.grad(3.0 * reference_logit_term(s, teacher.logits, rows["logits"][index], 0.7, 3.0), s)
    our_grad, = torch.autograd.grad(losses["richkd_logit"], student.logits)
    assert torch.allclose(our_grad.double(), ref_grad, rtol=1e-5, atol=1e-8)


def test_cached_rows_are_mixed_with_the_images_lambda(tmp_path):
    cache = write_cache(tmp_path / "cache")
    rows = torch.from_numpy(np.load(f"{cache}/logits.npy")[0]).double()
    richkd, source = make_richkd(richkd_args("--richkd-cache", cache, "--richkd-mode", "L"))
    index = torch.tensor([5, 1, 8, 2])
    for lam in (0.3, torch.tensor([[0.9], [0.6], [0.6], [0.9]])):
        student, teacher, batch = fixed_step(index, lam)
        weights = [lam] * 4 if isinstance(lam, float) else lam.flatten().tolist()
        mixed = torch.stack([weights[i] * rows[index[i]] + (1 - weights[i]) * rows[index[3 - i]] for i in range(4)])
        expected = 3.0 * reference_logit_term(student.logits, teacher.logits, mixed, 0.7, 3.0)
        assert torch.allclose(step_losses(richkd, source, student, teacher, batch)["richkd_logit"].double(), expected,
                              rtol=1e-6)


def test_modes_build_what_they_use(tmp_path):
    cache = write_cache(tmp_path / "cache")
    logit_only, source = make_richkd(richkd_args("--richkd-cache", cache, "--richkd-mode", "L"))
    assert logit_only.extra_parameter_count() == 0 and not list(logit_only.buffers())
    assert logit_only.self_synced_buffers() == [] and logit_only.student_request.embedding is False
    contrastive, _ = make_richkd(richkd_args("--richkd-cache", cache, "--richkd-mode", "F"))
    assert contrastive.extra_parameter_count() == (D_S + 1) * FEAT + (D_T + 1) * FEAT + (D_C + 1) * FEAT
    assert {f"contrast.{name}" for name in ("memory_student", "memory_teacher", "z", "step")} <= set(
        contrastive.self_synced_buffers())
    assert contrastive.teacher_request.logits is False and contrastive.teacher_request.embedding is True
    student, teacher, batch = fixed_step(torch.arange(6))
    assert set(step_losses(contrastive, source, student, teacher, batch)) == {"richkd_feat"}
    assert set(step_losses(logit_only, source, student, teacher, batch)) == {"richkd_logit"}
    defaults = richkd_args()
    assert (defaults.richkd_mode, defaults.richkd_alpha, defaults.richkd_temperature, defaults.richkd_logit_weight,
            defaults.richkd_feat_weight) == ("LF", 0.7, 3.0, 3.0, 0.8)


def test_start_up_errors_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="needs one second source"):
        make_richkd(richkd_args())
    cache = write_cache(tmp_path / "cache")
    with pytest.raises(UserError, match="needs one second source"):
        make_richkd(richkd_args("--richkd-cache", cache, "--richkd-source", "resnet18"))
    with pytest.raises(UserError, match="needs --richkd-source-pretrained"):
        make_richkd(richkd_args("--richkd-source", "resnet18"))
    with pytest.raises(UserError, match="built for another training set"):
        make_richkd(richkd_args("--richkd-cache", cache), labels=LABELS.roll(1))
    with pytest.raises(UserError, match="not found"):
        make_richkd(richkd_args("--richkd-cache", str(tmp_path / "missing")))
    partial = CacheWriter(tmp_path / "half", dataset_identity(LABELS, ["a", "b", "c"]), {}, {"logits": N_CLASSES})
    partial.write({"logits": np.zeros((2, N_CLASSES))})
    with pytest.raises(UserError, match="unfinished"):
        make_richkd(richkd_args("--richkd-cache", partial.partial))


def test_live_source_sees_the_batch_in_its_own_normalisation_and_size(saved_weights):
    """Student batches (synthetic data: mean 0.5, std 0.25, 32 px) are remapped to the source's 0.4/0.3 at 40 px."""
    weights = saved_weights("resnet18", num_classes=N_CLASSES)
    richkd, source = make_richkd(richkd_args(
        "--dataset", "synthetic", "--img-size", "32", "--richkd-source", "resnet18", "--richkd-source-pretrained",
        weights, "--richkd-source-mean", "0.4", "0.4", "0.4", "--richkd-source-std", "0.3", "0.3", "0.3",
        "--richkd-source-img-size", "40", "--richkd-mode", "L", "--teacher-precision", "fp32"))
    images = torch.randn(2, 3, 32, 32)
    source_model = source.model
    assert not any(p.requires_grad for p in source_model.parameters()) and not source_model.training
    expected = F.interpolate((images * 0.25 + 0.5 - 0.4) / 0.3, size=(40, 40), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected_logits = source_model(expected)
    _, teacher, batch = fixed_step(torch.arange(2))
    batch.images = images
    richkd.train()
    assert torch.allclose(source(batch).logits, expected_logits, atol=1e-5)
    assert not source_model.training, "the distiller's train() does not reach the source"
    assert not any(source_model is m for m in richkd.modules()) and not richkd.extra_state_dict()
