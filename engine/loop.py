"""The training epoch, one training step, and the evaluation pass."""
import contextlib
import datetime
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from timm.utils import accuracy, dispatch_clip_grad

from kdcore.distributed import all_reduce_sum, world_size
from kdcore.errors import UserError

from .checkpoint import save_recovery
from .preemption import stop_if_requested
from .views import batch_of


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def current_lr(optimizer):
    """The base learning rate: the largest of the groups' (layer decay scales the others down)."""
    return max(group["lr"] for group in optimizer.param_groups)


class LossTracker:
    """Sums detached loss tensors on the device; values are read (a host sync) only when logged.

    `sums`/`count` are those of a checkpoint taken mid-epoch, so a resumed epoch reports its full average."""

    def __init__(self, sums=None, count=0):
        self.sums, self.count = defaultdict(float, sums or {}), count
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

    def state(self):
        """The sums so far (a collective under DDP: every process must call it), for a mid-epoch checkpoint."""
        self.flush()
        return {"sums": dict(self.sums), "count": self.count}


def forward_backward(model, teacher, batch, *, autocast, scaler=None, divisor=1, sources=None):
    """The features of the teacher and of each second source in `sources` (frozen, no grad, each in its own
    precision, outside the student's autocast), the distiller's losses, and the backward of their sum / `divisor`
    (the micro-batches of one accumulated update). Returns the undivided total and its terms as tensors
    (not read here, so the step never waits on the device)."""
    teacher_feats = teacher(batch) if teacher is not None else None
    source_feats = {name: source(batch) for name, source in (sources or {}).items()}
    with autocast():
        _, losses = model(batch, teacher_feats, source_feats)
    loss = sum(losses.values())
    scaled = loss / divisor if divisor != 1 else loss
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss, losses


def optimizer_step(optimizer, *, scaler=None, clip_grad=None, clip_mode="norm", params=None):
    """Clip (after unscaling) and apply the gradients accumulated since they were last zeroed."""
    if scaler is not None:
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip_grad is not None:
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        optimizer.step()


def train_step(model, teacher, optimizer, batch, *, autocast, scaler=None, clip_grad=None, clip_mode="norm",
               params=None, sources=None):
    """One optimisation step on one batch (no accumulation); returns the total loss and its terms as tensors."""
    optimizer.zero_grad(set_to_none=True)
    loss, losses = forward_backward(model, teacher, batch, autocast=autocast, scaler=scaler, sources=sources)
    optimizer_step(optimizer, scaler=scaler, clip_grad=clip_grad, clip_mode=clip_mode, params=params)
    return loss, losses


def make_batch(images, labels, index, device, mixup=None, channels_last=False):
    """A `Batch` of already normalised images on `device`, mixed by timm's batch Mixup if given (the training
    loop builds its batches from the loader's views with `BatchBuilder`)."""
    batch = batch_of(images.to(device), labels.to(device), index.to(device), mixup)
    if channels_last:
        batch.images = batch.images.contiguous(memory_format=torch.channels_last)
    return batch


def updates_per_epoch(micro_batches, accum_steps):
    """Optimizer updates made from `micro_batches` loader batches: one per `accum_steps` of them, and one
    more, shorter, for a trailing remainder (as timm's train.py)."""
    return -(-micro_batches // accum_steps)


def accumulation_groups(loader, accum_steps):
    """Each loader batch with its position in its accumulation group and that group's size (the epoch's
    trailing group may be shorter); the optimizer steps after a group's last batch."""
    remaining = len(loader)
    for i, item in enumerate(loader):
        yield item, i % accum_steps, min(accum_steps, remaining - i + i % accum_steps)


def train_one_epoch(run, epoch, start_step=0, start_losses=None):
    """One pass over the training loader; returns {'loss': ..., term: ...} averaged over the epoch.

    Each optimizer update accumulates the gradients of --grad-accum-steps K loader batches (micro-batches of
    --batch-size, each loss divided by K; under DDP gradients are averaged over processes at the last one
    only). The epoch's trailing micro-batches that do not fill K make one last, shorter update, each loss
    divided by their own count, as in timm's train.py. Logging, the ETA, the lr schedule and
    --recovery-interval count optimizer updates; the loss averages are over micro-batches.
    `start_step` updates of this epoch were already made (a mid-epoch recovery checkpoint): the sampler skips
    their samples, and `start_losses` holds their loss sums.
    """
    args, env, progress = run.args, run.env, run.progress
    accum = args.grad_accum_steps
    run.model.train()
    loader = run.data.train_loader
    loader.sampler.set_epoch(epoch, start=start_step * accum * args.batch_size)
    steps = start_step + updates_per_epoch(len(loader), accum)
    tracker = LossTracker(**(start_losses or {}))
    step, start = start_step, time.time()
    params = [p for p in run.distiller.parameters() if p.requires_grad]
    run.where = f"epoch {epoch} step {step + 1}"
    for views, position, group_size in accumulation_groups(loader, accum):
        if position == 0:
            run.optimizer.zero_grad(set_to_none=True)
        batch = run.batches(views)
        closes_group = position == group_size - 1
        with run.model.no_sync() if env.distributed and not closes_group else contextlib.nullcontext():
            loss, losses = forward_backward(run.model, run.teacher, batch, autocast=run.autocast,
                                            scaler=run.scaler, divisor=group_size, sources=run.sources)
        tracker.add({"loss": loss, **losses})
        if not closes_group:
            continue
        optimizer_step(run.optimizer, scaler=run.scaler, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                       params=params)
        for ema in run.emas:
            ema.update(run.student, step=progress.global_step + 1)  # timm counts this update: the first copies
        progress.global_step += 1
        step += 1
        run.scheduler.step_update(num_updates=progress.global_step)
        if step == steps or step % args.log_interval == 0:
            means = tracker.flush()
            if not math.isfinite(means["loss"]):
                raise UserError(f"the loss became {means['loss']} at epoch {epoch} step {step}; lower --lr, set "
                                f"--clip-grad, or check the data and teacher (earlier epochs' checkpoints are kept)")
            _log_progress(run, epoch, step, steps, step - start_step, start, len(batch) * accum, means)
        saved = bool(args.recovery_interval and progress.global_step % args.recovery_interval == 0 and step < steps)
        if saved:
            save_recovery(run, epoch, step, tracker.state())
        stop_if_requested(run, epoch, step, tracker.state, saved)
        run.where = f"epoch {epoch} step {step + 1}"
    return tracker.flush()


def _log_progress(run, epoch, step, steps, timed_steps, start, images_per_step, means):
    """`step` of `steps` optimizer updates done; `timed_steps` of them by this process, since `start`."""
    if not run.env.is_main:
        return
    per_step = (time.time() - start) / timed_steps
    steps_left_run = (steps - step) + (run.args.epochs - epoch - 1) * steps
    lr = current_lr(run.optimizer)
    terms = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
    run.log.info(f"Train: {epoch} [{step:>4d}/{steps} ({100 * step / steps:3.0f}%)]  {terms}  "
                 f"lr {lr:.3e}  {images_per_step * run.env.world_size / per_step:.1f} img/s  "
                 f"ETA epoch {format_seconds(per_step * (steps - step))} "
                 f"run {format_seconds(per_step * steps_left_run)}")
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
