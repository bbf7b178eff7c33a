"""Test helper, launched by torch.distributed.run: train.py's run, then every process saves its own states.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_states.py <train.py arguments>
writes <run folder>/rank<r>.pt with that process's student, EMA and distiller-extra state dicts, so a
test can compare what each process holds (only rank 0 writes checkpoints).
"""
import os
import sys

import torch

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.run import build_run
from engine.train_args import build_train_parser
from engine.trainer import train
from kdcore.distributed import shutdown_distributed

if __name__ == "__main__":
    run = build_run(parse_args_with_config(build_train_parser(DISTILLERS), sys.argv[1:]))
    train(run)
    torch.save({"student": run.student.state_dict(), "emas": [ema.module.state_dict() for ema in run.emas],
                "extra": run.distiller.extra_state_dict()}, os.path.join(run.folder, f"rank{run.env.rank}.pt"))
    shutdown_distributed()
