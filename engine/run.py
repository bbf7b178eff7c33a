"""A training run, assembled by small build steps from parsed arguments.

`build_run(args, start)` checks every input and creates the run folder only once they are all good; `start`
(engine/run_folder.py) says whether the run continues a checkpoint.
Models are built from the same seed on every process (so the student, the distiller's extra modules and
the EMAs start identical everywhere); only data order and augmentation use per-process seeds.
"""
import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from distillers import build_distiller, get_distiller_class, refuse_unread_flags
from kdcore.distributed import DistEnv, init_distributed
from kdcore.errors import UserError
from kdcore.io import atomic_write_csv, remove_stale_temporaries
from kdcore.precision import autocast_context, resolve_teacher_precision

from .arg_ranges import check_ranges
from .batchnorm import convert_sync_batchnorm
from .checkpoint import restore_training_state
from .config import save_args_yaml
from .datasets import dataset_labels
from .loader import build_batch_builder, build_loaders, load_datasets, mixes, resolve_data_settings
from .loop import updates_per_epoch
from .models import RATE_FLAGS, count_parameters, create_model
from .optim import build_optimizer, resolve_lr
from .preemption import StopRequests, remove_preempted_marker
from .run_folder import ResumePoint, check_fresh_folder, decided_by_main_process, named_folder
from .run_log import Scalars, make_logger
from .sources import FrozenSource, build_extra_sources, build_frozen_teacher, build_teacher_model
from .teacher_cache import CachedTeacher, check_run_teacher_cache, open_run_teacher_cache
from .views import BatchBuilder
from .weights import load_weights

EVAL_METRICS = ("top1", "top5", "loss")
# create_model arguments that have flags of their own, so --model-kwargs may not set them
MODEL_KWARGS_WITH_FLAGS = {"num_classes": "--num-classes", "img_size": "--img-size", "pretrained": "--pretrained",
                           **RATE_FLAGS}


@dataclass
class Data:
    kind: str  # cifar100, imagenet, fashion_mnist, synthetic
    source: str  # where it was read from
    train_loader: DataLoader
    val_loader: DataLoader
    config: dict  # timm's data config of the student: input_size, mean, std, interpolation, crop_pct
    train_size: int
    val_size: int
    train_labels: torch.Tensor  # class of each training sample, by dataset index


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""
    start_epoch: int = 0
    global_step: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    history: List[dict] = field(default_factory=list)  # one summary row per finished epoch
    start_step: int = 0  # optimizer updates of start_epoch already made (resumed from a recovery checkpoint)
    start_losses: Optional[dict] = None  # their loss sums (LossTracker.state)


@dataclass
class Run:
    args: argparse.Namespace
    env: DistEnv
    data: Data
    student: nn.Module
    distiller: nn.Module  # the student plus the distiller's own modules (AAD, projectors)
    model: nn.Module  # what the training step calls: the distiller, or its DDP wrapper
    teacher: Optional[FrozenSource]
    sources: Dict[str, Any]  # second sources by name (FrozenSource or CachedSource), called beside the teacher
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    emas: List[ModelEmaV3]
    batches: BatchBuilder  # the loader's views to the distiller's Batch: normalised, erased, mixed
    autocast: Callable  # context factory for the student step
    folder: str
    log: logging.Logger
    progress: Progress = field(default_factory=Progress)
    writer: Optional[Scalars] = None  # TensorBoard, rank 0 only
    teacher_metrics: Optional[dict] = None
    given_args: dict = field(default_factory=dict)  # the arguments as the first launch gave them (resume compares)
    stops: StopRequests = field(default_factory=StopRequests)  # set by the stop signals' handlers
    created_folder: bool = False  # this launch made the run folder (removed if it fails before a checkpoint)
    has_checkpoint: bool = False  # the folder holds a checkpoint of this run
    where: str = "start-up"  # where the run stands, for the messages of faults


def ema_prefixes(args):
    if not args.model_ema:
        return []
    decays = args.model_ema_decay
    return ["ema"] if len(decays) == 1 else [f"ema{decay:g}" for decay in decays]


def check_arguments(args, env):
    """Inputs that can be refused before anything is built (the ranges are checked before this)."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (it is per process), got {args.batch_size}")
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    flagged = {key: flag for key, flag in MODEL_KWARGS_WITH_FLAGS.items() if key in args.model_kwargs}
    if flagged:
        raise UserError(f"--model-kwargs sets {', '.join(flagged)}, which the run sets from "
                        f"{', '.join(flagged.values())}: use those flags instead")
    if args.torchcompile_mode and not args.compile:
        raise UserError(f"--torchcompile-mode {args.torchcompile_mode} needs --compile; add it or drop the mode")
    if args.mixup_off_epoch < 0:
        raise UserError(f"--mixup-off-epoch must be 0 (mix every epoch) or an epoch number, got {args.mixup_off_epoch}")
    if args.lr is not None and args.lr_base is not None and args.resume in ("", "auto"):  # a fresh run
        raise UserError(f"--lr {args.lr:g} and --lr-base {args.lr_base:g} are both set (--lr perhaps by the -c "
                        f"config): keep one. --lr is the learning rate itself, --lr-base is scaled by the global "
                        f"batch (to drop a config's lr, include the config in your own with `lr: null`)")
    for flag, value, least in (("--grad-accum-steps", args.grad_accum_steps, 1),
                               ("--recovery-interval", args.recovery_interval, 0),
                               ("--checkpoint-hist", args.checkpoint_hist, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.sync_bn and env.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernels); drop it on CPU")
    allowed = EVAL_METRICS + tuple(f"{p}_{m}" for p in ema_prefixes(args) for m in EVAL_METRICS)
    if args.eval_metric not in allowed:
        raise UserError(f"--eval-metric {args.eval_metric!r} is not one of {', '.join(allowed)}")
    distiller_cls = get_distiller_class(args.distiller)
    refuse_unread_flags(distiller_cls, args)
    if distiller_cls.feature_requests(args)[1] is None:
        args.teacher = ""  # vanilla training ignores a teacher given by a shared config
    elif not args.teacher and not args.teacher_cache:
        raise UserError(f"--distiller {args.distiller} needs a teacher: pass --teacher NAME --teacher-pretrained "
                        f"PATH (or --teacher-cache DIR), or use --distiller vanilla")
    if args.teacher_cache and distiller_cls.needs_live_teacher:
        raise UserError(f"--teacher-cache: --distiller {args.distiller} needs the live teacher "
                        f"({distiller_cls.needs_live_teacher}); drop --teacher-cache and pass --teacher NAME "
                        f"--teacher-pretrained PATH")
    if args.check_cache and not (args.teacher_cache and args.teacher and args.teacher_pretrained):
        raise UserError(f"--check-cache {args.check_cache} recomputes cache entries with the live teacher: it needs "
                        f"--teacher-cache DIR, --teacher NAME and --teacher-pretrained PATH")


def ground_truth_criterion(args):
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixes(args) else args.smoothing,
                                  target_threshold=args.bce_target_thresh)
    if mixes(args):
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def input_size(args):
    if args.img_size:
        return args.img_size
    return args.input_size[-1] if args.input_size else None


def build_student(args):
    """The student from timm, with --model-kwargs passed to its constructor (as timm's train.py does)."""
    student = create_model(args.model, num_classes=args.num_classes, img_size=input_size(args),
                           pretrained=args.pretrained, pretrained_path=args.pretrained_path, drop_rate=args.drop,
                           drop_path_rate=args.drop_path, drop_block_rate=args.drop_block, **args.model_kwargs)
    check_input_fits(student, args)
    if args.initial_checkpoint:
        load_weights(student, args.initial_checkpoint, args.model, role="initial")
    return student


def check_input_fits(student, args):
    """One image of the --img-size/--input-size given through the student (eval mode, no grad): a size the
    architecture cannot take (smaller than a ViT's patch, not a multiple of Swin's windows) is refused by name."""
    size = input_size(args)
    if not size:
        return  # the model's own
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            student(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"--img-size {size} does not fit --model {args.model} ({first_line}); choose an input size "
                        f"the architecture takes (a multiple of its patch size and windows)") from None
    finally:
        student.train(was_training)


def build_data(args, env, student, train_set, val_set, kind):
    config = resolve_data_settings(args, student, train_set)
    train_loader, val_loader = build_loaders(args, env, train_set, val_set, config)
    if len(train_loader) == 0:
        raise UserError(f"the training set has {len(train_set)} samples, fewer than one batch per process "
                        f"(-b {args.batch_size} x {env.world_size}); lower --batch-size")
    return Data(kind=kind, source=str(train_set.source), train_loader=train_loader, val_loader=val_loader,
                config=config, train_size=len(train_set), val_size=len(val_set),
                train_labels=dataset_labels(train_set))


def check_mixup(args):
    if mixes(args) and not get_distiller_class(args.distiller).supports_mixup:
        raise UserError(f"--distiller {args.distiller} does not support mixup/cutmix; set --mixup 0 --cutmix 0")


def build_distiller_for(args, env, student, teacher_model, sources, data):
    """The distiller, built knowing the requested stages' shapes (a dry run at the real input sizes)."""
    student_size = data.config["input_size"]
    teacher_size = (3, args.teacher_img_size, args.teacher_img_size) if args.teacher_img_size else student_size
    return build_distiller(args, student, input_size=student_size, teacher=teacher_model,
                           teacher_input_size=teacher_size, sources=sources,
                           gt_criterion=ground_truth_criterion(args), dataset_size=data.train_size,
                           train_labels=data.train_labels, world_size=env.world_size)


def build_emas(args, student):
    """One timm ModelEmaV3 of the student per --model-ema-decay (none without --model-ema); with
    --model-ema-warmup each decay ramps up as 1 - n^(-2/3) at update n until it reaches its value."""
    if not args.model_ema:
        return []
    return [ModelEmaV3(student, decay=decay, use_warmup=args.model_ema_warmup) for decay in args.model_ema_decay]


def wrap_for_training(distiller, env):
    """DDP around the distiller (student and extra modules), except for buffers the distiller syncs itself."""
    if not env.distributed:
        return distiller
    ignored = distiller.self_synced_buffers()
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
    return DistributedDataParallel(distiller, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def join_processes(args):
    """This process's DistEnv (the process group joined), once the values it needs are checked."""
    check_ranges(args)
    return init_distributed(args.device, args.local_rank, args.dist_timeout)


def build_run(args, start=None, stops=None, given_args=None, env=None):
    """Check every input and build the run; the run folder is created only once all inputs are good.

    `start` (a ResumePoint) holds the checkpoint the run continues, if any; `stops` the stop requests the
    signal handlers set; `given_args` the arguments as given (recorded in checkpoints for later resumes);
    `env` the process group already joined (`join_processes`), if it was."""
    start = start or ResumePoint()
    env = env or join_processes(args)
    random_seed(args.seed, 0)  # the same on every process while models are built
    check_arguments(args, env)
    lr_origin = resolve_lr(args, env.world_size)
    autocast = autocast_context(args, env.device)
    if args.teacher or args.teacher_cache:
        args.teacher_precision, precision_reason = resolve_teacher_precision(args.teacher_precision, env.device)

    kind, train_set, val_set = load_datasets(args)
    if args.num_classes is not None and args.num_classes < train_set.num_classes:
        raise UserError(f"--num-classes {args.num_classes} is smaller than the {train_set.num_classes} classes "
                        f"of the {kind} dataset; set --num-classes {train_set.num_classes}")
    args.num_classes = args.num_classes or train_set.num_classes
    args.dataset = kind

    student = build_student(args)
    teacher_model = None
    if not args.teacher_cache or args.check_cache:
        # Its weights come from its checkpoint; the initialisation drawn first must not shift the distiller's,
        # so that a run from a teacher cache, which builds no teacher, starts from the same weights.
        with torch.random.fork_rng():
            teacher_model = build_teacher_model(args, args.num_classes, input_size(args))
    data = build_data(args, env, student, train_set, val_set, kind)
    cached_teacher = None
    if args.teacher_cache:
        cached_teacher = open_run_teacher_cache(args, data, get_distiller_class(args.distiller))
    batches = build_batch_builder(args, data.config, args.num_classes)
    check_mixup(args)
    distiller_cls = get_distiller_class(args.distiller)
    sources = build_extra_sources(args, distiller_cls, data.train_labels, data.config, env.device)
    distiller = build_distiller_for(args, env, student, cached_teacher or teacher_model, sources, data)

    if args.channels_last:
        student.to(memory_format=torch.channels_last)
    if args.sync_bn and env.distributed:
        distiller.student = student = convert_sync_batchnorm(student)
    distiller.to(env.device)
    teacher = None
    if teacher_model is not None:
        teacher = build_frozen_teacher(args, teacher_model, distiller.teacher_request, env.device, data.config)
        distiller.attach_teacher(teacher)
    if cached_teacher is not None:
        if args.check_cache:
            check_run_teacher_cache(args, cached_teacher, teacher, data.train_loader.dataset, batches)
        teacher = cached_teacher

    optimizer = build_optimizer(distiller, args)
    scaler = torch.amp.GradScaler("cuda") if args.amp and args.amp_dtype == "float16" else None
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                       updates_per_epoch=updates_per_epoch(len(data.train_loader),
                                                                           args.grad_accum_steps))
    if args.compile:
        distiller.compile(mode=args.torchcompile_mode)  # in place: parameter names and checkpoints stay the same
    model = wrap_for_training(distiller, env)
    emas = build_emas(args, student)
    random_seed(args.seed, env.rank)  # from here on: per-process data order and augmentation

    if start.checkpoint is not None:
        folder = os.path.dirname(os.path.abspath(start.path))
    else:
        folder = start.folder or named_folder(args)
        decided_by_main_process(lambda: check_fresh_folder(folder, resuming_auto=args.resume == "auto"), env)
    created = not os.path.isdir(folder)
    if env.is_main:  # created only now that every input has been checked
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        remove_preempted_marker(folder)
        save_args_yaml(args, os.path.join(folder, "args.yaml"))
    run = Run(args=args, env=env, data=data, student=student, distiller=distiller, model=model, teacher=teacher,
              sources=sources,
              optimizer=optimizer, scheduler=scheduler, scaler=scaler, emas=emas, batches=batches, autocast=autocast,
              folder=folder, log=make_logger(folder, env.is_main), given_args=given_args or {},
              stops=stops or StopRequests(), created_folder=created and env.is_main,
              has_checkpoint=start.checkpoint is not None)
    if env.is_main:
        for note in start.notes:
            run.log.info(note)
        for warning in start.warnings:
            run.log.warning(f"warning: {warning}")
    report_startup(run, precision_reason if args.teacher else "", lr_origin)
    if start.checkpoint is not None:
        resume(run, start.checkpoint)
    if env.is_main:
        run.writer = Scalars(folder)
    return run


def resume(run, checkpoint):
    """Continue from a checkpoint; last of the build steps, so the RNG state restored is the one training
    continues from."""
    mid_epoch = "epoch_step" in checkpoint  # a recovery checkpoint names the epoch in progress
    if mid_epoch and len(checkpoint["rng"]) != run.env.world_size:
        raise UserError(f"--resume {run.args.resume!r} stopped mid-epoch in a run of {len(checkpoint['rng'])} "
                        f"process(es), at a position in each one's share of the epoch; resume it with that many "
                        f"processes, or resume {os.path.join(run.folder, 'last.pth.tar')} (an epoch's end) "
                        f"with {run.env.world_size}")
    rng_restored = restore_training_state(checkpoint, run, optimizer_state=not run.args.no_resume_opt)
    run.progress = Progress(start_epoch=checkpoint["epoch"] + (0 if mid_epoch else 1),
                            global_step=checkpoint["global_step"], best_metric=checkpoint["best_metric"],
                            best_epoch=checkpoint["best_epoch"], history=checkpoint["history"],
                            start_step=checkpoint.get("epoch_step", 0), start_losses=checkpoint.get("epoch_losses"))
    if run.args.no_resume_opt:
        place_fresh_scheduler(run.scheduler, run.progress, run.args.warmup_epochs)
    if run.progress.start_epoch >= run.args.epochs:
        raise UserError(f"the run in {run.folder!r} already finished its {run.args.epochs} epochs; pass a larger "
                        f"--epochs with --resume to train it further")
    if run.env.is_main:
        atomic_write_csv(run.progress.history, os.path.join(run.folder, "summary.csv"))
    at_step = f" after step {run.progress.start_step}" if mid_epoch else ""
    run.log.info(f"Resumed from {run.args.resume}: continuing at epoch {run.progress.start_epoch}{at_step}")
    if not rng_restored:
        run.log.warning(f"the checkpoint was written by {len(checkpoint['rng'])} process(es), this run has "
                        f"{run.env.world_size}: data order and augmentation restart from fresh seeds, so the "
                        f"result will not match an uninterrupted run exactly")


def place_fresh_scheduler(scheduler, progress, warmup_epochs):
    """Set the lr of a scheduler built afresh (--no-resume-opt) to where the run stands, as timm's train.py does.

    timm's schedules are functions of the epoch (or update) count, so stepping to the position is enough; the
    end of warmup comes first because the plateau schedule only sets its base lr there (its reductions, which
    depend on past metrics, start over)."""
    if warmup_epochs:
        scheduler.step(min(progress.start_epoch, warmup_epochs))
    scheduler.step(progress.start_epoch)
    scheduler.step_update(num_updates=progress.global_step)


def report_startup(run, precision_reason, lr_origin=""):
    args, env, data = run.args, run.env, run.data
    n_student = count_parameters(run.student)
    n_extra = run.distiller.extra_parameter_count()
    batch, accum = args.batch_size * env.world_size, args.grad_accum_steps
    accumulation = f" x {accum} accumulated = {batch * accum} per update" if accum > 1 else ""
    run.log.info(f"Run folder: {run.folder}  ({env.world_size} process(es) on {env.device.type}, "
                 f"global batch {batch}{accumulation})")
    run.log.info(f"Data: {data.kind} from {data.source}: {data.train_size} train / {data.val_size} val, "
                 f"{args.num_classes} classes, input {tuple(data.config['input_size'])}")
    run.log.info(f"Student {args.model}: {n_student:,} parameters")
    run.log.info(f"Learning rate {args.lr:.6g} ({lr_origin or '--lr'})")
    if isinstance(run.teacher, CachedTeacher):
        meta = run.teacher.cache.meta
        run.log.info(f"Teacher {args.teacher}: read from the cache {args.teacher_cache} ({meta['epochs']} epochs of "
                     f"views, {meta['dtype']}, built {meta['build'].get('date', '?')} by "
                     f"{meta['build'].get('processes', '?')} process(es)); no teacher model is built"
                     + (f"; {run.teacher.check_report}" if run.teacher.check_report else ""))
    elif run.teacher is not None:
        run.log.info(f"Teacher {args.teacher}: {count_parameters(run.teacher.model):,} parameters (frozen, "
                     f"{args.teacher_precision}: {precision_reason}) from {args.teacher_pretrained}")
    run.log.info(f"Distiller {args.distiller}: {n_extra:,} extra trainable parameters "
                 f"({n_extra / n_student:.3f}x the student)")
