"""The training epoch, one training step, and the evaluation pass."""
import contextlib
import datetime
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from timm.utils import accuracy, dispatch_clip_grad

from .batch import Batch
from .distributed import all_reduce_sum, world_size
from .errors import UserError


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def current_lr(optimizer):
    """The base learning rate: the largest of the groups' (layer decay scales the others down)."""
    return max(group["lr"] for group in optimizer.param_groups)


class LossTracker:
    """Sums detached loss tensors on the device; values are read (a host sync) only when logged."""

    def __init__(self):
        self.sums, self.count = defaultdict(float), 0
        self._pending, self._pending_count = {}, 0

    def add(self, losses):
        for name, value in losses.items():
            value = value.detach()
            self._pending[name] = self._pending[name] + value if name in self._pending else value
        self._pending_count += 1

    def flush(self):
        """Average over processes, fold into the running sums, and return the mean of each term so far."""
        if self._pending:
            names = sorted(self._pending)
            stacked = torch.stack([self._pending[n].float() for n in names])
            stacked = (all_reduce_sum(stacked) / world_size()).tolist()
            for name, value in zip(names, stacked):
                self.sums[name] += value
            self.count += self._pending_count
            self._pending, self._pending_count = {}, 0
        ordered = sorted(self.sums, key=lambda name: (name != "loss", name))
        return {name: self.sums[name] / max(self.count, 1) for name in ordered}


def train_step(model, teacher, optimizer, batch, *, autocast, scaler=None, clip_grad=None, clip_mode="norm",
               params=None):
    """One optimisation step: teacher features (frozen, no grad), the distiller's losses, backward, update.

    Returns the total loss and its terms as tensors (not read here, so the step never waits on the device).
    """
    teacher_feats = teacher(batch.images) if teacher is not None else None
    with autocast():
        _, losses = model(batch, teacher_feats)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad is not None:
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        optimizer.step()
    return loss, losses


def make_batch(images, labels, index, device, mixup=None, channels_last=False):
    """Move one loader batch to the device, apply mixup/cutmix, and package it for the distiller."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    index = index.to(device, non_blocking=True)
    targets, lam = labels, 1.0
    if mixup is not None:
        images, targets, labels, lam = mixup(images, labels)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Batch(images=images, targets=targets, labels=labels, index=index, lam=lam)


def train_one_epoch(run, epoch):
    """One pass over the training loader; returns {'loss': ..., term: ...} averaged over the epoch."""
    args, env, progress = run.args, run.env, run.progress
    run.model.train()
    loader = run.data.train_loader
    loader.sampler.set_epoch(epoch)
    tracker = LossTracker()
    steps = len(loader)
    start = time.time()
    params = [p for p in run.distiller.parameters() if p.requires_grad]
    for step, (images, labels, index) in enumerate(loader):
        batch = make_batch(images, labels, index, env.device, run.mixup, args.channels_last)
        loss, losses = train_step(run.model, run.teacher, run.optimizer, batch, autocast=run.autocast,
                                  scaler=run.scaler, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                                  params=params)
        for ema in run.emas:
            ema.update(run.student, step=progress.global_step + 1)  # timm counts this update: the first copies
        progress.global_step += 1
        run.scheduler.step_update(num_updates=progress.global_step)
        tracker.add({"loss": loss, **losses})
        if step == steps - 1 or (step + 1) % args.log_interval == 0:
            means = tracker.flush()
            if not math.isfinite(means["loss"]):
                raise UserError(f"the loss became {means['loss']} at epoch {epoch} step {step + 1}; lower --lr, set "
                                f"--clip-grad, or check the data and teacher (earlier epochs' checkpoints are kept)")
            _log_progress(run, epoch, step, steps, start, len(batch), means)
    return tracker.flush()


def _log_progress(run, epoch, step, steps, start, batch_size, means):
    if not run.env.is_main:
        return
    elapsed = time.time() - start
    per_step = elapsed / (step + 1)
    steps_left_run = (steps - step - 1) + (run.args.epochs - epoch - 1) * steps
    lr = current_lr(run.optimizer)
    terms = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
    run.log.info(f"Train: {epoch} [{step + 1:>4d}/{steps} ({100 * (step + 1) / steps:3.0f}%)]  {terms}  "
                 f"lr {lr:.3e}  {batch_size * run.env.world_size / per_step:.1f} img/s  "
                 f"ETA epoch {format_seconds(per_step * (steps - step - 1))} run {format_seconds(per_step * steps_left_run)}")
    if run.writer is not None:
        for k, v in means.items():
            run.writer.add_scalar(f"train/{k}", v, run.progress.global_step)
        run.writer.add_scalar("train/lr", lr, run.progress.global_step)


@contextlib.contextmanager
def eval_mode(module):
    """`module` in eval mode (BatchNorm uses its running statistics, dropout is off), then as it was."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.inference_mode()
def evaluate(predict, loader, env, autocast=contextlib.nullcontext, channels_last=False):
    """Top-1, top-5 (%) and mean cross-entropy of `predict(images) -> logits` over this process's shard,
    summed exactly over processes. A module is evaluated in eval mode, and left in the mode it had.

    timm provides the per-batch `accuracy`, used here; its train.py's validation averages each process's mean
    instead (`reduce_tensor`), which is off when shards differ in size or are padded, so hits are counted."""
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss sum, top1 hits, top5 hits, count
    with eval_mode(predict) if isinstance(predict, torch.nn.Module) else contextlib.nullcontext():
        for images, targets in loader:
            images = images.to(env.device, non_blocking=True)
            targets = targets.to(env.device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = predict(images).float()
            top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
            n = targets.shape[0]
            totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                                   top1.double() * n / 100, top5.double() * n / 100,
                                   torch.tensor(n, dtype=torch.float64, device=env.device)])
    loss_sum, hits1, hits5, count = all_reduce_sum(totals).tolist()
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": 100 * hits1 / count, "top5": 100 * hits5 / count}
