"""Transforms (timm's factory), samplers and data loaders for training and evaluation.

On CUDA the loaders are timm's: workers hand over uint8 images (`fast_collate`) and `PrefetchLoader` copies the
next batch to the GPU while the current one is used, normalising it (and random-erasing training images) there.
Elsewhere the workers normalise, as torchvision's pipeline does. Mixup/CutMix runs on the device either way, on
normalised images (mixing commutes with the per-channel normalisation, so this equals mixing the raw images).
"""
import contextlib
import multiprocessing
import multiprocessing.forkserver
import random

import numpy as np
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from kdcore.errors import UserError

from .datasets import IndexedDataset, build_dataset, infer_dataset_kind


def resolve_data_settings(args, model, dataset):
    """timm's data config for `model`, with the dataset's mean/std unless --mean/--std are given."""
    overrides = dict(vars(args))
    overrides["mean"] = args.mean or dataset.mean
    overrides["std"] = args.std or dataset.std
    if args.img_size:
        overrides["input_size"] = (3, args.img_size, args.img_size)
    return resolve_data_config(overrides, model=model)


def worker_processes(workers):
    """DataLoader keyword arguments for `workers` worker processes, started by a fork server.

    A worker forked straight from a training process copies the locks its other threads hold at that instant
    (TensorBoard's writer, the queues' feeder threads, gloo's), and a copied lock that was held is never released:
    the worker hangs before its first sample, and the run with it (seen in CI, in the evaluation loader of a resumed
    2-process run). The fork server is a single-threaded process, started once per process with torch, timm and
    this module imported, so the workers it forks start clean and fast. It is started here, when the loaders are
    built, so that its imports overlap with building the models."""
    if workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return dict(num_workers=workers)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])  # read once, when the server starts
    multiprocessing.forkserver.ensure_running()
    return dict(num_workers=workers, multiprocessing_context=context)


def uses_prefetcher(device):
    """Whether the loaders for `device` are timm's PrefetchLoader (CUDA only: it overlaps host-to-GPU copies)."""
    return torch.device(device).type == "cuda"


def build_train_transform(args, data_config, prefetch=False):
    return create_transform(
        input_size=data_config["input_size"], is_training=True, no_aug=args.no_aug,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, crop_pct=data_config["crop_pct"], use_prefetcher=prefetch)


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


def sample_seeds(seed, epoch, rank, count):
    """(count, 3) seeds, one row per position of a process's epoch list: for torch's, numpy's and Python's RNG
    (three independent values, so the three generators never replay one another's stream)."""
    generator = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch, rank])
    return generator.integers(0, 2 ** 32, size=(count, 3), dtype=np.uint32)


class ResumableSampler(Sampler):
    """A process's samples for an epoch, from `sampler` (DistributedSampler or RepeatAugSampler), each paired
    with the seeds of its augmentation, and able to start part-way into the epoch.

    The seeds depend on (run seed, epoch, rank, position in the epoch's list) alone, not on which loader
    worker loads the sample nor on what was loaded before. So a run resumed mid-epoch, which skips the
    positions already trained on, draws the augmentations of an uninterrupted run; and micro-batches of
    --grad-accum-steps see the same augmentations as one large batch.
    """

    def __init__(self, sampler, seed, rank):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """The epoch's order; `start`: how many of its positions were already trained on (skipped)."""
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self):
        indices = list(self.sampler)
        seeds = sample_seeds(self.seed, self.epoch, self.rank, len(indices))
        for position in range(self.start, len(indices)):
            yield indices[position], tuple(seeds[position].tolist())

    def __len__(self):
        return len(self.sampler) - self.start


@contextlib.contextmanager
def seeded_rngs(seeds, restore):
    """torch's (CPU), numpy's and Python's global RNGs seeded from `seeds`; with `restore`, as they were after."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if restore else None
    torch.random.default_generator.manual_seed(seeds[0])
    np.random.seed(seeds[1])
    random.seed(seeds[2])
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class SeededSamples(Dataset):
    """`dataset[index]` for keys `(index, seeds)` from ResumableSampler, loaded with the global RNGs seeded
    by the sample's own seeds (transforms draw from them). In the main process (--workers 0) the RNG states
    are restored afterwards, so loading data never shifts the training step's own draws (mixup, dropout)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seeds = key
        with seeded_rngs(seeds, restore=get_worker_info() is None):
            return self.dataset[index]


def _collate_label_and_index(samples):
    """fast_collate for (image, label, index) samples: label and index travel as one (B, 2) target, which
    PrefetchLoader moves to the device as it does any target."""
    return fast_collate([(image, torch.tensor([label, index])) for image, label, index in samples])


class IndexedPrefetchLoader(PrefetchLoader):
    """timm's PrefetchLoader over `_collate_label_and_index` batches, yielding (images, labels, indices)."""

    def __iter__(self):
        for images, label_and_index in super().__iter__():
            yield images, label_and_index[:, 0], label_and_index[:, 1]


def build_loaders(args, env, train_set, val_set, data_config, prefetch=None):
    """The training loader yields (images, labels, dataset indices); the validation loader (images, labels).

    With `prefetch` (default: on CUDA) both are timm's PrefetchLoader and yield tensors already on the device."""
    prefetch = uses_prefetcher(env.device) if prefetch is None else prefetch
    train_set.transform = build_train_transform(args, data_config, prefetch)
    if args.aug_repeats:
        train_sampler = RepeatAugSampler(train_set, num_replicas=env.world_size, rank=env.rank,
                                         num_repeats=args.aug_repeats)
    else:
        train_sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank,
                                           shuffle=True, seed=args.seed)
    # Augmentations are seeded per sample (ResumableSampler). The loaders get their own generator for the
    # worker base seed they draw at each epoch, so starting an epoch never advances the global RNG that a
    # checkpoint restores (mixup, dropout and distillers draw from it).
    common = dict(**worker_processes(args.workers), pin_memory=env.device.type == "cuda")
    train_loader = DataLoader(SeededSamples(IndexedDataset(train_set)), batch_size=args.batch_size,
                              sampler=ResumableSampler(train_sampler, args.seed, env.rank), drop_last=True,
                              collate_fn=_collate_label_and_index if prefetch else None,
                              generator=torch.Generator(), **common)
    val_loader = build_eval_loader(val_set, data_config, args.validation_batch_size or args.batch_size, args.workers,
                                   env.device, sampler=_shard(len(val_set), env.rank, env.world_size),
                                   prefetch=prefetch)
    if not prefetch:
        return train_loader, val_loader
    erasing = dict(re_prob=0.0 if args.no_aug else args.reprob, re_mode=args.remode, re_count=args.recount)
    return IndexedPrefetchLoader(train_loader, **erasing, **_normalisation(data_config, env.device)), val_loader


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


def build_mixup(args, num_classes):
    """Mixup/CutMix (None when neither is enabled); the per-process batch must be even (timm pairs each
    image with its mirror in the batch)."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2:
        raise UserError(f"--mixup/--cutmix need an even per-process batch size (each image is mixed with its "
                        f"mirror in the batch), got -b {args.batch_size}; use -b {args.batch_size + 1}")
    return MixupWithLabels(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)
