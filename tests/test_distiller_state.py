"""Distiller state (memory banks, queues): buffers the distiller keeps identical on every rank itself are left
alone by DDP (which broadcasts rank 0's buffers at every forward), saved with the distiller, kept out of the
student export."""
import torch
from torch import nn

from distillers import Distiller, build_distiller
from engine.run import wrap_for_training
from kdcore.distributed import DistEnv


class TinyStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("plain", torch.zeros(3))  # an ordinary buffer: DDP syncs it from rank 0


class BankDistiller(Distiller):
    def __init__(self, student, context):
        super().__init__(student, context)
        self.register_buffer("bank", torch.zeros(4))

    def self_synced_buffers(self):
        return ["bank"]

    def forward(self, x):
        return self.student.fc(x).sum()


def build():
    args = type("Args", (), {"gt_loss_weight": 1.0, "seed": 0})()
    return build_distiller(args, TinyStudent(), num_classes=2, distiller_cls=BankDistiller)


def _rank(rank, world_size):
    torch.manual_seed(0)
    distiller = build()
    distiller.bank.fill_(rank + 1)
    distiller.student.plain.fill_(rank + 1)
    model = wrap_for_training(distiller, DistEnv(rank=rank, world_size=world_size))
    model(torch.ones(2, 3)).backward()  # DDP broadcasts rank 0's buffers before this forward
    return {"bank": distiller.bank.clone(), "plain": distiller.student.plain.clone()}


def test_self_synced_buffers_are_not_broadcast_by_ddp(gloo_pair):
    rank1 = gloo_pair.run(_rank)[1]
    assert torch.equal(rank1["plain"], torch.full((3,), 1.0)), "an ordinary buffer takes rank 0's value"
    assert torch.equal(rank1["bank"], torch.full((4,), 2.0)), "the distiller's own buffer keeps rank 1's value"


def test_distiller_buffers_are_saved_with_the_distiller_not_the_student():
    distiller = build()
    distiller.bank.fill_(7)
    assert torch.equal(distiller.extra_state_dict()["bank"], torch.full((4,), 7.0))
    assert "bank" not in distiller.student.state_dict() and "student.plain" not in distiller.extra_state_dict()
    again = build()
    again.load_extra_state_dict(distiller.extra_state_dict())
    assert torch.equal(again.bank, distiller.bank)
