"""Builds a run from parsed arguments and drives it: setup, epochs, evaluation, checkpoints, summary."""
import logging
import os
import shutil
import sys
import time
from types import SimpleNamespace

import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, update_summary
from torch.nn.parallel import DistributedDataParallel

from distillers import build_distiller, DISTILLERS

from .checkpoint import (atomic_save, read_training_checkpoint, remove_stale_temporaries,
                         restore_training_state, training_state)
from .config import save_args_yaml
from .distributed import init_distributed
from .errors import UserError
from .loader import build_loaders, build_mixup, load_datasets, resolve_data_settings, seed_everything
from .loop import autocast_context, evaluate, format_seconds, train_one_epoch
from .models import count_parameters, create_model, load_weights
from .teacher import FrozenTeacher, build_teacher_model


def _ground_truth_criterion(args, mixup):
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixup else args.smoothing, target_threshold=args.bce_target_thresh)
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def _input_size(args):
    if args.img_size:
        return args.img_size
    return args.input_size[-1] if args.input_size else None


def _build_student(args, num_classes):
    student = create_model(args.model, num_classes=num_classes, img_size=_input_size(args),
                           pretrained=args.pretrained, drop_rate=args.drop, drop_path_rate=args.drop_path,
                           drop_block_rate=args.drop_block)
    if args.initial_checkpoint:
        load_weights(student, args.initial_checkpoint, args.model, role="initial")
    return student


def _run_folder(args, env):
    """The folder of this run: the resumed checkpoint's, or a new one under --output (never reused)."""
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    name = args.experiment or "-".join(
        [time.strftime("%Y%m%d-%H%M%S"), args.distiller, args.model] + ([args.teacher] if args.teacher else []))
    folder = os.path.join(args.output, name)
    if os.path.exists(os.path.join(folder, "last.pth.tar")):
        raise UserError(f"run folder {folder!r} already holds a run; continue it with --resume "
                        f"{folder}/last.pth.tar or choose another --experiment")
    return folder


def _make_logger(folder, is_main):
    log = logging.getLogger("train")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(os.path.join(folder, "log.txt")))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


def setup_run(args):
    """Validate every input and build the run; the run folder is created only once all inputs are good."""
    env = init_distributed(args.device, args.local_rank)
    seed_everything(args.seed, env.rank)
    distiller_cls = DISTILLERS[args.distiller]
    if distiller_cls.teacher_request is None:
        args.teacher = ""  # vanilla training ignores a teacher given by a shared config
    elif not args.teacher:
        raise UserError(f"--distiller {args.distiller} needs a teacher: pass --teacher NAME --teacher-pretrained "
                        f"PATH, or use --distiller vanilla")
    autocast = autocast_context(args, env.device)
    if args.sync_bn and env.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernels); drop it on CPU")

    dataset_kind, train_set, val_set = load_datasets(args)
    if args.num_classes is not None and args.num_classes < train_set.num_classes:
        raise UserError(f"--num-classes {args.num_classes} is smaller than the {train_set.num_classes} classes "
                        f"of the {dataset_kind} dataset; set --num-classes {train_set.num_classes}")
    args.num_classes = args.num_classes or train_set.num_classes
    args.dataset = dataset_kind

    student = _build_student(args, args.num_classes)
    teacher_model = build_teacher_model(args, args.num_classes, _input_size(args))
    data_config = resolve_data_settings(args, student, train_set)
    train_loader, val_loader = build_loaders(args, env, train_set, val_set, data_config)
    if len(train_loader) == 0:
        raise UserError(f"the training set has {len(train_set)} samples, fewer than one batch per process "
                        f"(-b {args.batch_size} x {env.world_size}); lower --batch-size")
    mixup = build_mixup(args, args.num_classes)
    distiller = build_distiller(args.distiller, student, teacher_model, args,
                                _ground_truth_criterion(args, mixup))
    checkpoint = read_training_checkpoint(args.resume) if args.resume else None

    if args.channels_last:
        student.to(memory_format=torch.channels_last)
    if args.sync_bn and env.distributed:
        distiller.student = student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    distiller.to(env.device)
    teacher = None
    if teacher_model is not None:
        teacher = FrozenTeacher(teacher_model, distiller.teacher_request, env.device, args.teacher_precision,
                                compile=args.compile)
        if args.channels_last:
            teacher.model.to(memory_format=torch.channels_last)

    try:
        optimizer = create_optimizer_v2(distiller, **optimizer_kwargs(args))
    except ValueError as exc:  # e.g. timm's 'sgd' is Nesterov, which refuses --momentum 0
        raise UserError(f"optimizer settings rejected ({exc}); check --opt {args.opt} with --momentum/--lr/"
                        f"--weight-decay (for SGD without momentum use --opt momentum --momentum 0)") from None
    scaler = torch.amp.GradScaler("cuda") if args.amp and args.amp_dtype == "float16" else None
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=len(train_loader))
    emas = [ModelEmaV3(student, decay=decay) for decay in args.model_ema_decay] if args.model_ema else []
    if args.compile:
        distiller.compile()  # in place: parameter names and checkpoints stay the same
    model = distiller
    if env.distributed:
        model = DistributedDataParallel(distiller, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    folder = _run_folder(args, env)  # created only now that every input has been checked
    if env.is_main:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        save_args_yaml(args, os.path.join(folder, "args.yaml"))
    log = _make_logger(folder, env.is_main)
    run = SimpleNamespace(
        args=args, env=env, log=log, folder=folder, student=student, distiller=distiller, model=model,
        teacher=teacher, optimizer=optimizer, scheduler=scheduler, scaler=scaler, emas=emas, mixup=mixup,
        train_loader=train_loader, val_loader=val_loader, autocast=autocast, data_config=data_config,
        writer=None, start_epoch=0, global_step=0, best_metric=None, best_epoch=None, teacher_metrics=None)
    _report_startup(run, dataset_kind, train_set, len(val_set))
    if teacher is not None and not args.no_eval_teacher:
        run.teacher_metrics = evaluate(teacher.predict, val_loader, env, channels_last=args.channels_last)
        log.info(f"Teacher {args.teacher}: top-1 {run.teacher_metrics['top1']:.2f}  "
                 f"top-5 {run.teacher_metrics['top5']:.2f}  (validation set)")
    if checkpoint is not None:  # last, so the RNG state restored is the one training continues from
        restore_training_state(checkpoint, student=student, distiller=distiller, optimizer=optimizer,
                               scheduler=scheduler, scaler=scaler, emas=emas)
        run.start_epoch, run.global_step = checkpoint["epoch"] + 1, checkpoint["global_step"]
        run.best_metric, run.best_epoch = checkpoint["best_metric"], checkpoint["best_epoch"]
        log.info(f"Resumed from {args.resume}: continuing at epoch {run.start_epoch}")
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(log_dir=folder)
    return run


def _report_startup(run, dataset_kind, train_set, n_val):
    args, env = run.args, run.env
    n_student = count_parameters(run.student)
    n_extra = run.distiller.extra_parameter_count()
    run.log.info(f"Run folder: {run.folder}  ({env.world_size} process(es) on {env.device.type}, "
                 f"global batch {args.batch_size * env.world_size})")
    run.log.info(f"Data: {dataset_kind} from {train_set.source}: {len(train_set)} train / {n_val} val, "
                 f"{args.num_classes} classes, input {tuple(run.data_config['input_size'])}")
    run.log.info(f"Student {args.model}: {n_student:,} parameters")
    if args.teacher:
        run.log.info(f"Teacher {args.teacher}: {count_parameters(run.teacher.model):,} parameters (frozen, "
                     f"{args.teacher_precision}) from {args.teacher_pretrained}")
    run.log.info(f"Distiller {args.distiller}: {n_extra:,} extra trainable parameters "
                 f"({n_extra / n_student:.3f}x the student)")


def _save_checkpoints(run, epoch, is_best):
    state = training_state(epoch=epoch, global_step=run.global_step, args=run.args, student=run.student,
                           distiller=run.distiller, optimizer=run.optimizer, scheduler=run.scheduler,
                           scaler=run.scaler, emas=run.emas, best_metric=run.best_metric, best_epoch=run.best_epoch)
    atomic_save(state, os.path.join(run.folder, "last.pth.tar"))
    atomic_save(run.student.state_dict(), os.path.join(run.folder, "student_last.pth"))
    if is_best:
        for src, dst in (("last.pth.tar", "best.pth.tar"), ("student_last.pth", "student_best.pth")):
            tmp = os.path.join(run.folder, dst + ".tmp")
            shutil.copyfile(os.path.join(run.folder, src), tmp)
            os.replace(tmp, os.path.join(run.folder, dst))


def _evaluate_epoch(run, epoch):
    args, env = run.args, run.env
    metrics = evaluate(run.student, run.val_loader, env, run.autocast, args.channels_last)
    for ema, decay in zip(run.emas, args.model_ema_decay):
        ema_metrics = evaluate(ema.module, run.val_loader, env, run.autocast, args.channels_last)
        prefix = "ema" if len(run.emas) == 1 else f"ema{decay:g}"
        metrics.update({f"{prefix}_{k}": v for k, v in ema_metrics.items()})
    run.log.info("Eval: " + f"{epoch}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics


def train(run):
    args, env, log = run.args, run.env, run.log
    wall_start = time.time()
    metrics = {}
    for epoch in range(run.start_epoch, args.epochs):
        train_metrics, run.global_step = train_one_epoch(run, epoch, run.global_step)
        run.scheduler.step(epoch + 1)
        metrics = _evaluate_epoch(run, epoch)
        if args.eval_metric not in metrics:
            raise UserError(f"--eval-metric {args.eval_metric!r} is not one of {', '.join(metrics)}")
        value = metrics[args.eval_metric]
        better = value < run.best_metric if "loss" in args.eval_metric else value > (run.best_metric or -1)
        is_best = run.best_metric is None or better
        if is_best:
            run.best_metric, run.best_epoch = value, epoch
        if env.is_main:
            summary = os.path.join(run.folder, "summary.csv")
            update_summary(epoch, train_metrics, metrics, summary, lr=run.optimizer.param_groups[0]["lr"],
                           write_header=not os.path.exists(summary))
            for k, v in metrics.items():
                run.writer.add_scalar(f"eval/{k}", v, epoch)
            _save_checkpoints(run, epoch, is_best)
    if env.is_main:
        run.writer.close()
        teacher_top1 = f"{run.teacher_metrics['top1']:.2f}" if run.teacher_metrics else "n/a"
        student_top1 = f"{metrics['top1']:.2f}" if metrics else "n/a"
        best = f"{run.best_metric:.2f} @ epoch {run.best_epoch}" if run.best_metric is not None else "n/a"
        log.info(f"Done: teacher top-1 {teacher_top1} | student top-1 {student_top1} (best {args.eval_metric} "
                 f"{best}) | epochs {args.epochs} | wall {format_seconds(time.time() - wall_start)} | "
                 f"output {run.folder}")
    return metrics
