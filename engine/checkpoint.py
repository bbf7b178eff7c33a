"""Complete, atomic, weights_only-loadable training checkpoints: what they hold, RNG states, recovery files."""
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist

from kdcore.errors import UserError
from kdcore.io import atomic_save

from .faults import share_write_outcome
from .weights import read_checkpoint

CHECKPOINT_VERSION = 3  # 2: one RNG state per process and the epoch history; 3: CRD/RichKD state under contrast.


def capture_rng_state():
    """This process's RNG states as tensors and plain lists, so torch.load(weights_only=True) can read them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's own device
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_objects(obj, world_size):
    """`obj` of every process, in rank order (a collective: every rank must call it)."""
    if world_size == 1:
        return [obj]
    objects = [None] * world_size
    dist.all_gather_object(objects, obj)
    return objects


def gather_rng_states(world_size):
    """Every process's RNG states, in rank order (a collective: every rank must call it)."""
    return gather_objects(capture_rng_state(), world_size)


def ema_buffers(emas):
    """This process's buffers (BatchNorm running statistics) of each EMA, on the CPU. Mid-epoch they differ
    between processes: DDP gives every student rank 0's buffers at each forward, but each process's EMA
    averages what its own student held after its own micro-batch. At an epoch's end `--dist-bn` evens them."""
    return [{name: buffer.detach().cpu() for name, buffer in ema.module.named_buffers()} for ema in emas]


def training_state(run, epoch, rng_states):
    """Everything `--resume` needs. 'state_dict'/'state_dict_ema' follow timm's naming. `epoch` is the last
    finished one; a recovery checkpoint (`save_recovery`) instead names the epoch in progress and adds its
    position in it."""
    return {
        "version": CHECKPOINT_VERSION, "epoch": epoch, "global_step": run.progress.global_step,
        "arch": run.args.model, "args": vars(run.args),  # "arch" as in timm's own checkpoints
        "given_args": run.given_args,  # as the run's first launch gave them: what a resume compares flags with
        "state_dict": run.student.state_dict(),
        "state_dict_ema": run.emas[0].module.state_dict() if run.emas else None,
        "ema_states": [ema.state_dict() for ema in run.emas],
        "distiller_extra": run.distiller.extra_state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rng_states,
        "best_metric": run.progress.best_metric, "best_epoch": run.progress.best_epoch,
        "history": run.progress.history,
    }


RECOVERY_NAME = re.compile(r"recovery-(\d+)-(\d+)\.pth\.tar")


def recovery_position(path):
    """(epoch, optimizer updates done in it) of a recovery checkpoint's file name; None for other files."""
    match = RECOVERY_NAME.fullmatch(os.path.basename(path))
    return (int(match[1]), int(match[2])) if match else None


def recovery_path(folder, epoch, epoch_step):
    return os.path.join(folder, f"recovery-{epoch}-{epoch_step}.pth.tar")


def prune_recovery_files(folder, newest, keep):
    """Delete the recovery checkpoints written before `newest` (an (epoch, step)) beyond the `keep` latest.

    Files after `newest` are left alone: they come from a run that was resumed from an earlier file, and this
    run overwrites them as it reaches their positions."""
    positions = sorted(p for p in map(recovery_position, os.listdir(folder)) if p is not None and p <= newest)
    for epoch, step in positions[:-keep]:
        os.remove(recovery_path(folder, epoch, step))


def written_by_main_process(run, name, write):
    """`write()` on rank 0, then every rank learns its outcome (a collective): a failed write stops all of them
    with the same StorageFailure; a successful one marks the run as holding a checkpoint."""
    error = None
    if run.env.is_main:
        try:
            write()
        except OSError as exc:
            error = exc
    share_write_outcome(run, error, name)
    run.has_checkpoint = True


def save_recovery(run, epoch, epoch_step, epoch_losses):
    """A mid-epoch checkpoint after `epoch_step` optimizer updates of `epoch`: the epoch checkpoint's states
    plus the position, the epoch's loss sums so far (`LossTracker.state`) and every process's EMA buffers
    (`ema_buffers`: they differ between processes mid-epoch). A collective: every process
    calls it at the same step. The oldest files beyond --checkpoint-hist go once the new one is on disk.
    Returns the file's path."""
    rng_states = gather_rng_states(run.env.world_size)
    emas_by_rank = gather_objects(ema_buffers(run.emas), run.env.world_size)
    path = recovery_path(run.folder, epoch, epoch_step)

    def write():
        state = {**training_state(run, epoch, rng_states), "epoch_step": epoch_step, "epoch_losses": epoch_losses,
                 "ema_buffers": emas_by_rank}
        atomic_save(state, path)
        prune_recovery_files(run.folder, (epoch, epoch_step), run.args.checkpoint_hist)

    run.where = f"epoch {epoch} step {epoch_step} (recovery checkpoint)"
    written_by_main_process(run, os.path.basename(path), write)
    return path


def restore_training_state(ckpt, run, optimizer_state=True):
    """Load a checkpoint's states into the built run (the optimizer's, scheduler's and scaler's only with
    `optimizer_state`); returns whether this process's RNG state was restored (it is not when the process
    count changed since the checkpoint was written)."""
    run.student.load_state_dict(ckpt["state_dict"])
    run.distiller.load_extra_state_dict(ckpt["distiller_extra"])
    if optimizer_state:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if run.scaler is not None and ckpt["scaler"] is not None:
            run.scaler.load_state_dict(ckpt["scaler"])
    for ema, state in zip(run.emas, ckpt["ema_states"]):
        ema.load_state_dict(state)
    states = ckpt["rng"]
    if len(states) != run.env.world_size:
        return False
    restore_rng_state(states[run.env.rank])
    if "ema_buffers" in ckpt:  # a recovery checkpoint: each process gets its own EMAs' buffers back
        for ema, buffers in zip(run.emas, ckpt["ema_buffers"][run.env.rank]):
            for name, buffer in ema.module.named_buffers():
                buffer.copy_(buffers[name])
    return True


def read_training_checkpoint(path):
    """A checkpoint written by `training_state`, checked before anything is built from it."""
    ckpt = read_checkpoint(path, label="--resume checkpoint")
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "version" not in ckpt:
        raise UserError(f"--resume {path!r} is not a training checkpoint of this repo (last.pth.tar); to start "
                        f"from weights only, use --initial-checkpoint")
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise UserError(f"--resume {path!r} was written by another version of this repo (checkpoint version "
                        f"{ckpt['version']}, this code reads {CHECKPOINT_VERSION}); start from its weights with "
                        f"--initial-checkpoint {path}")
    return ckpt
