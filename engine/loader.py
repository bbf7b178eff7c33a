"""Transforms (timm's factory), samplers and data loaders for training and evaluation.

Training: the workers hand over uint8 views keyed by the sample (engine/views.py: crop, flip, colour jitter,
RandAugment, random erasing and sample-paired mixup drawn from (seed, epoch, index, repeat)); they are normalised,
erased and mixed on the device, on the CPU and on CUDA alike (on CUDA the next batch is copied on a side stream).
Evaluation: on CUDA timm's loader (uint8 batches normalised on the GPU by its `PrefetchLoader`), elsewhere
torchvision's pipeline in the workers. timm's batch Mixup/CutMix runs on the device on normalised images (mixing
commutes with the per-channel normalisation, so this equals mixing the raw images).
"""
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading

import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, DistributedSampler

from kdcore.errors import UserError

from .datasets import build_dataset, infer_dataset_kind
from .views import BatchBuilder, DeviceLoader, KeyedErasing, KeyedSampler, KeyedViews, SampleMixing, collate_views


def resolve_data_settings(args, model, dataset):
    """timm's data config for `model`, with the dataset's mean/std unless --mean/--std are given."""
    overrides = dict(vars(args))
    overrides["mean"] = args.mean or dataset.mean
    overrides["std"] = args.std or dataset.std
    if args.img_size:
        overrides["input_size"] = (3, args.img_size, args.img_size)
    return resolve_data_config(overrides, model=model)


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")


def ignore_stop_signals():
    """Ignore the signals that ask a run to stop, in the fork server (engine/worker_signals.py) and in each
    loader worker (`start_worker`). SLURM signals every process of a job, and torchrun a worker's whole process
    group: the loader must keep serving until the training process has written its recovery checkpoint."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def process_gone(pid):
    """Whether process `pid` has ended (a zombie, not yet reaped by its parent, has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel (a zombie then counts as alive)
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True


def _serve_training_process(training_pid):
    """A loader worker's watch: SIGTERM (blocked in every thread) is taken here; it ends the worker when the
    training process sent it (its DataLoader or multiprocessing shutting the workers down) and is ignored
    otherwise (SLURM or torchrun signalling every process). The worker also ends within half a second of the
    training process."""
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 0.5)
        if (info is not None and info.si_pid == training_pid) or process_gone(training_pid):
            os._exit(0)


def start_worker(training_pid, worker_id):
    """The loaders' worker_init_fn (after torch's own handlers, whose SIGTERM handler ends a worker signalled by
    anyone but its parent, the fork server here): stop signals ignored, SIGTERM left to `_serve_training_process`.
    The fork server ignores the signals too and lives while its workers do, so torch's watch of the worker's
    parent would never fire; the watch of the training process replaces it."""
    ignore_stop_signals()
    if not hasattr(signal, "sigtimedwait"):  # not Linux: the stop signals are ignored, torch's own watch stays
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_serve_training_process, args=(training_pid,), daemon=True,
                     name="serve-training-process").start()


def worker_processes(workers):
    """DataLoader keyword arguments for `workers` worker processes, started by a fork server.

    A worker forked straight from a training process copies the locks its other threads hold at that instant
    (TensorBoard's writer, the queues' feeder threads, gloo's), and a copied lock that was held is never released:
    the worker hangs before its first sample, and the run with it (seen in CI, in the evaluation loader of a resumed
    2-process run). The fork server is a single-threaded process, started once per process with torch, timm and
    this module imported, so the workers it forks start clean and fast. It is started here, when the loaders are
    built, so that its imports overlap with building the models. Workers persist across epochs (as timm's
    loaders do): a worker started by the server receives its dataset pickled, which is paid once per run, not
    at every epoch and evaluation (views are keyed by the sample, so a worker's history does not matter)."""
    if workers == 0:
        return dict(num_workers=0)
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return dict(num_workers=workers, persistent_workers=True,
                    worker_init_fn=functools.partial(start_worker, os.getpid()))
    context = multiprocessing.get_context("forkserver")
    # read once, when the server starts; worker_signals makes the server and its workers ignore stop signals
    context.set_forkserver_preload(["__main__", __name__, "engine.worker_signals"])
    multiprocessing.forkserver.ensure_running()
    return dict(num_workers=workers, multiprocessing_context=context, persistent_workers=True,
                worker_init_fn=functools.partial(start_worker, os.getpid()))


def uses_prefetcher(device):
    """Whether the loaders for `device` are timm's PrefetchLoader (CUDA only: it overlaps host-to-GPU copies)."""
    return torch.device(device).type == "cuda"


def build_train_transform(args, data_config):
    """timm's training transform up to uint8 views; random erasing and normalisation come later (engine/views.py)."""
    return create_transform(
        input_size=data_config["input_size"], is_training=True, no_aug=args.no_aug,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], re_prob=0.0, crop_pct=data_config["crop_pct"],
        use_prefetcher=True)


def build_eval_transform(data_config, prefetch=False):
    return create_transform(input_size=data_config["input_size"], is_training=False,
                            interpolation=data_config["interpolation"], mean=data_config["mean"],
                            std=data_config["std"], crop_pct=data_config["crop_pct"], use_prefetcher=prefetch)


def load_datasets(args):
    """Train and validation datasets (no transforms yet); --dataset inferred from the folder if omitted."""
    kind = args.dataset or infer_dataset_kind(args.data_dir)
    return kind, build_dataset(kind, args.data_dir, "train", args), build_dataset(kind, args.data_dir, "val", args)


def _shard(n, rank, world_size):
    """Evaluation indices of one process: every world_size-th sample, no padding, so metrics are exact."""
    return list(range(rank, n, world_size))


def augmentation_seed(args):
    """The seed of every view's key: --aug-seed, else --seed (so runs of several --seed can share one cache)."""
    return args.seed if getattr(args, "aug_seed", None) is None else args.aug_seed


def build_loaders(args, env, train_set, val_set, data_config, prefetch=None):
    """The training loader yields `ViewBatch`es on the device (engine/views.py); the validation loader (images,
    labels).

    With `prefetch` (default: on CUDA) the training loader copies the next batch on a side stream, and the
    validation loader is timm's PrefetchLoader, yielding tensors already on the device."""
    prefetch = uses_prefetcher(env.device) if prefetch is None else prefetch
    train_set.transform = build_train_transform(args, data_config)
    if args.aug_repeats:
        train_sampler = RepeatAugSampler(train_set, num_replicas=env.world_size, rank=env.rank,
                                         num_repeats=args.aug_repeats)
    else:
        train_sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank,
                                           shuffle=True, seed=args.seed)
    erasing, mixing = build_erasing(args), build_sample_mixing(args)
    # The loaders get their own generator for the worker base seed they draw at each epoch, so starting an epoch
    # never advances the global RNG that a checkpoint restores (batch mixup, dropout and distillers draw from it).
    views = KeyedViews(train_set, augmentation_seed(args), erasing, mixing)
    train_loader = DataLoader(views, batch_size=args.batch_size, sampler=KeyedSampler(train_sampler, args.aug_repeats),
                              drop_last=True, collate_fn=collate_views, generator=torch.Generator(),
                              pin_memory=env.device.type == "cuda", **worker_processes(args.workers))
    val_loader = build_eval_loader(val_set, data_config, args.validation_batch_size or args.batch_size, args.workers,
                                   env.device, sampler=_shard(len(val_set), env.rank, env.world_size),
                                   prefetch=prefetch)
    return DeviceLoader(train_loader, env.device, side_stream=prefetch), val_loader


def _normalisation(data_config, device):
    """PrefetchLoader's arguments that normalise the images on `device`."""
    return dict(mean=data_config["mean"], std=data_config["std"], channels=data_config["input_size"][0],
                device=device)


def build_eval_loader(dataset, data_config, batch_size, workers, device, sampler=None, prefetch=None):
    """(images, labels) batches of `dataset` with the evaluation transform, in order; on CUDA (or with
    `prefetch`) through timm's PrefetchLoader, normalised on the device."""
    prefetch = uses_prefetcher(device) if prefetch is None else prefetch
    dataset.transform = build_eval_transform(data_config, prefetch)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, **worker_processes(workers),
                        pin_memory=torch.device(device).type == "cuda", collate_fn=fast_collate if prefetch else None,
                        generator=torch.Generator())
    return PrefetchLoader(loader, **_normalisation(data_config, device)) if prefetch else loader


class MixupWithLabels(Mixup):
    """timm's Mixup/CutMix (which also applies label smoothing), returning what distillers need as well.

    `mixup(images, labels) -> (mixed images, soft targets, hard labels, lam)`: each image is mixed with its
    mirror in the batch; its hard label is its dominant class (the argmax of its soft target, as the
    reference code reduces mixed targets) and `lam` the weight of the image itself. The mixing is timm's
    own; only the return value differs from `Mixup.__call__`.
    """

    def __call__(self, x, target):
        lam = {"elem": self._mix_elem, "pair": self._mix_pair}.get(self.mode, self._mix_batch)(x)
        soft = mixup_target(target, self.num_classes, lam, self.label_smoothing, self.multi_label)
        return x, soft, soft.argmax(dim=1), lam


def mixes(args):
    """Whether the run mixes images (Mixup, CutMix or both)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args, num_classes):
    """timm's batch Mixup/CutMix of `--mixup-pairing batch` (None when the run does not mix or pairs by sample);
    the per-process batch must be even (timm pairs each image with its mirror in the batch)."""
    if not mixes(args) or args.mixup_pairing == "sample":
        return None
    if args.batch_size % 2:
        raise UserError(f"--mixup/--cutmix need an even per-process batch size (each image is mixed with its "
                        f"mirror in the batch), got -b {args.batch_size}; use -b {args.batch_size + 1}, or "
                        f"--mixup-pairing sample")
    return MixupWithLabels(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                           prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                           label_smoothing=args.smoothing, num_classes=num_classes)


def build_erasing(args):
    """Random erasing drawn per sample (None without --reprob, or under --no-aug)."""
    return None if args.no_aug or not args.reprob else KeyedErasing(args.reprob, args.remode, args.recount)


def build_sample_mixing(args):
    """The per-sample draws of `--mixup-pairing sample` (None otherwise)."""
    if not mixes(args) or args.mixup_pairing != "sample":
        return None
    return SampleMixing(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                        prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, off_epoch=args.mixup_off_epoch)


def build_batch_builder(args, data_config, num_classes):
    """What turns the training loader's views into the distiller's `Batch` (normalised, erased, mixed)."""
    return BatchBuilder(data_config["mean"], data_config["std"], num_classes,
                        batch_mixup=build_mixup(args, num_classes),
                        sample_pairing=mixes(args) and args.mixup_pairing == "sample", smoothing=args.smoothing,
                        channels_last=args.channels_last)
