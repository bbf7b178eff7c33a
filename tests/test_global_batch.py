"""Batch-statistics losses over the global batch: 2 gloo processes with B/2 each give the same distillation
loss (as logged: the mean over processes) and the same weights after two SGD steps as 1 process fed the same global
batch in the gathered order (rank 0's half, then rank 1's), to 1e-5; CRD's memory banks equal the 1-process banks on
both ranks.

The student is BatchNorm-free (DeiT), so nothing but the loss couples the samples of a batch.
"""
import contextlib

import pytest
import torch

from distillers import DISTILLERS, build_distiller
from engine.loop import train_step
from engine.models import create_model
from engine.run import wrap_for_training
from engine.sources import FrozenSource
from engine.train_args import build_train_parser
from kdcore.batch import Batch
from kdcore.distributed import DistEnv

CLASSES, IMG, GLOBAL_BATCH, STEPS, DATASET = 5, 32, 8, 2, 40
METHODS = ("correlation", "crd", "dist", "rkd")  # the loss term of each is named as the method


def global_batches():
    generator = torch.Generator().manual_seed(3)
    labels_of = torch.arange(DATASET) % CLASSES
    for _ in range(STEPS):
        index = torch.randperm(DATASET, generator=generator)[:GLOBAL_BATCH]
        yield torch.randn(GLOBAL_BATCH, 3, IMG, IMG, generator=generator), labels_of[index], index


def train(name, rank=0, world_size=1):
    """STEPS SGD steps of distiller `name`; this process takes its slice of each global batch."""
    args = build_train_parser(DISTILLERS).parse_args(["--distiller", name, "--crd-k", "16"])
    torch.manual_seed(0)
    student = create_model("deit_tiny_patch16_224", num_classes=CLASSES, img_size=IMG)
    teacher_model = create_model("resnet18", num_classes=CLASSES, img_size=IMG)
    distiller = build_distiller(args, student, input_size=IMG, teacher=teacher_model, num_classes=CLASSES,
                                dataset_size=DATASET, train_labels=torch.arange(DATASET) % CLASSES,
                                world_size=world_size).train()
    model = wrap_for_training(distiller, DistEnv(rank=rank, world_size=world_size))
    teacher = FrozenSource(teacher_model, distiller.teacher_request, "cpu", "fp32")
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05)
    part = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    terms = []
    for images, labels, index in global_batches():
        batch = Batch(images=images[part], targets=labels[part], labels=labels[part], index=index[part])
        _, losses = train_step(model, teacher, optimizer, batch, autocast=contextlib.nullcontext)
        terms.append(losses[name].item())
    return terms, {k: v.detach().clone() for k, v in distiller.state_dict().items()}


def _rank(rank, world_size, name):
    return train(name, rank, world_size)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_two_processes_equal_one_process_on_the_global_batch(gloo_pair, name):
    terms1, state1 = train(name)
    runs = gloo_pair.run(_rank, name)
    # The logged loss is the mean over processes (CRD scores each process's own anchors; the others compute
    # the global-batch loss on every process).
    mean_terms = [(a + b) / 2 for a, b in zip(runs[0][0], runs[1][0])]
    assert mean_terms == pytest.approx(terms1, rel=1e-5, abs=1e-7), (terms1, mean_terms)
    for rank, (_, state2) in enumerate(runs):
        for key, value in state1.items():
            if value.is_floating_point():
                assert torch.allclose(state2[key], value, rtol=1e-5, atol=1e-6), f"rank {rank}: {key}"
            else:
                assert torch.equal(state2[key], value), f"rank {rank}: {key}"
    torch.manual_seed(0)
    start = create_model("deit_tiny_patch16_224", num_classes=CLASSES, img_size=IMG).state_dict()
    assert not torch.allclose(state1["student.head.weight"], start["head.weight"]), "the steps must move the weights"
