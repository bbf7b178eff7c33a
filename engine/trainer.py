"""Drives a built run: epochs, evaluation in eval mode, BatchNorm statistics, checkpoints, summary."""
import os
import time

from kdcore.io import atomic_copy, atomic_save, atomic_write_csv

from .batchnorm import sync_batchnorm_stats
from .checkpoint import gather_rng_states, training_state, written_by_main_process
from .faults import as_fault
from .loop import current_lr, evaluate, format_seconds, train_one_epoch
from .preemption import stop_if_requested
from .run import ema_prefixes
from .teacher_cache import CachedTeacher


def improves(value, best, metric):
    """Whether `value` beats `best` (None: nothing yet) for `metric`; lower is better for a loss."""
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


def switch_off_mixup(run, epoch):
    """timm's --mixup-off-epoch: from that epoch on, batches are not mixed (lam 1); the mixup function still
    turns labels into (smoothed) one-hot targets, so the ground-truth loss stays the same function. (Sample-paired
    mixing stops by itself: the loader's views know their epoch.)"""
    mixup = run.batches.batch_mixup
    if mixup is not None and run.args.mixup_off_epoch and epoch >= run.args.mixup_off_epoch:
        mixup.mixup_enabled = False


def evaluate_epoch(run):
    """Scores the student and each EMA on the validation set, in eval mode; BatchNorm statistics are first
    made identical on every process (`--dist-bn reduce`: averaged), so all score and save the same model."""
    args, env = run.args, run.env
    if env.distributed and args.dist_bn:
        sync_batchnorm_stats([run.student] + [ema.module for ema in run.emas], env.world_size,
                               average=args.dist_bn == "reduce")
    loader, autocast = run.data.val_loader, run.autocast
    metrics = evaluate(run.student, loader, env, autocast, args.channels_last)
    for ema, prefix in zip(run.emas, ema_prefixes(args)):
        metrics.update({f"{prefix}_{k}": v for k, v in evaluate(ema.module, loader, env, autocast,
                                                                args.channels_last).items()})
    return metrics


def save_epoch(run, epoch, is_best):
    """last.pth.tar first, then summary.csv from the history it holds, then the best copies; each atomic."""
    rng_states = gather_rng_states(run.env.world_size)  # every process takes part
    folder = run.folder

    def write():
        atomic_save(training_state(run, epoch, rng_states), os.path.join(folder, "last.pth.tar"))
        atomic_save(run.student.state_dict(), os.path.join(folder, "student_last.pth"))
        atomic_write_csv(run.progress.history, os.path.join(folder, "summary.csv"))
        if is_best:
            atomic_copy(os.path.join(folder, "last.pth.tar"), os.path.join(folder, "best.pth.tar"))
            atomic_copy(os.path.join(folder, "student_last.pth"), os.path.join(folder, "student_best.pth"))

    run.where = f"the end of epoch {epoch} (checkpoint)"
    written_by_main_process(run, "the epoch checkpoint (last.pth.tar, summary.csv, best copies)", write)


def train(run):
    """The run's epochs; a fault of the machine (a lost peer, a dead loader worker) comes out as its RunFault."""
    try:
        return train_epochs(run)
    except (RuntimeError, OSError) as exc:  # torch.distributed's and the DataLoader's errors
        fault = as_fault(exc, run)
        if fault is None:
            raise
        raise fault from None


def train_epochs(run):
    args, env, log, progress = run.args, run.env, run.log, run.progress
    if isinstance(run.teacher, CachedTeacher):
        run.teacher_metrics = run.teacher.metrics
        if run.teacher_metrics:
            log.info(f"Teacher {args.teacher}: top-1 {run.teacher_metrics['top1']:.2f}  "
                     f"top-5 {run.teacher_metrics['top5']:.2f}  (validation set, recorded when the cache was built)")
    elif run.teacher is not None and not args.no_eval_teacher:
        run.where = "the teacher's evaluation at start-up"
        run.teacher_metrics = evaluate(run.teacher.predict, run.data.val_loader, env,
                                       channels_last=args.channels_last)
        log.info(f"Teacher {args.teacher}: top-1 {run.teacher_metrics['top1']:.2f}  "
                 f"top-5 {run.teacher_metrics['top5']:.2f}  (validation set)")
    wall_start = time.time()
    metrics = {}
    for epoch in range(progress.start_epoch, args.epochs):
        if epoch > progress.start_epoch:
            stop_if_requested(run, epoch)  # a signal during the evaluation or the checkpoint
        switch_off_mixup(run, epoch)
        start = (progress.start_step, progress.start_losses) if epoch == progress.start_epoch else (0, None)
        train_metrics = train_one_epoch(run, epoch, *start)
        run.where = f"the evaluation of epoch {epoch}"
        metrics = evaluate_epoch(run)
        log.info(f"Eval: {epoch}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        value = metrics[args.eval_metric]
        is_best = improves(value, progress.best_metric, args.eval_metric)
        if is_best:
            progress.best_metric, progress.best_epoch = value, epoch
        progress.history.append({"epoch": epoch, **{f"train_{k}": v for k, v in train_metrics.items()},
                                 **{f"eval_{k}": v for k, v in metrics.items()}, "lr": current_lr(run.optimizer)})
        run.scheduler.step(epoch + 1, value)  # after evaluation, with the metric (plateau needs it)
        save_epoch(run, epoch, is_best)
        if run.writer is not None:
            for k, v in metrics.items():
                run.writer.add_scalar(f"eval/{k}", v, epoch)
    if env.is_main:
        run.writer.close()
        teacher_top1 = f"{run.teacher_metrics['top1']:.2f}" if run.teacher_metrics else "n/a"
        student_top1 = f"{metrics['top1']:.2f}" if metrics else "n/a"
        best = "n/a"
        if progress.best_metric is not None:
            best = f"{progress.best_metric:.2f} @ epoch {progress.best_epoch}"
        log.info(f"Done: teacher top-1 {teacher_top1} | student top-1 {student_top1} (best {args.eval_metric} "
                 f"{best}) | epochs {args.epochs} | wall {format_seconds(time.time() - wall_start)} | "
                 f"output {run.folder}")
    return metrics
