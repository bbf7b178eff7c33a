"""Complete, atomic, weights_only-loadable training checkpoints, and student-only exports."""
import glob
import os
import random

import numpy as np
import torch

from .errors import UserError
from .models import read_checkpoint

CHECKPOINT_VERSION = 1


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(folder):
    """Partial files a killed process left behind (the real files are never partial)."""
    for path in glob.glob(os.path.join(folder, "*.tmp")):
        os.remove(path)


def capture_rng_state():
    """RNG states as tensors and plain lists, so torch.load(weights_only=True) can read them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(*, epoch, global_step, args, student, distiller, optimizer, scheduler, scaler, emas,
                   best_metric, best_epoch):
    """Everything `--resume` needs. 'state_dict'/'state_dict_ema' follow timm's naming."""
    return {
        "version": CHECKPOINT_VERSION, "epoch": epoch, "global_step": global_step,
        "arch": args.model, "args": vars(args),  # "arch" as in timm's own checkpoints
        "state_dict": student.state_dict(),
        "state_dict_ema": emas[0].module.state_dict() if emas else None,
        "ema_states": [ema.state_dict() for ema in emas],
        "distiller_extra": distiller.extra_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng_state(),
        "best_metric": best_metric, "best_epoch": best_epoch,
    }


def restore_training_state(ckpt, *, student, distiller, optimizer, scheduler, scaler, emas):
    student.load_state_dict(ckpt["state_dict"])
    distiller.load_extra_state_dict(ckpt["distiller_extra"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    for ema, state in zip(emas, ckpt["ema_states"]):
        ema.load_state_dict(state)
    restore_rng_state(ckpt["rng"])


def read_training_checkpoint(path):
    """A checkpoint written by `training_state`, checked before anything is built from it."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION or "optimizer" not in ckpt:
        raise UserError(f"--resume {path!r} is not a training checkpoint of this repo (last.pth.tar); to start "
                        f"from weights only, use --initial-checkpoint")
    return ckpt
