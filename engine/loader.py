"""Transforms (timm's factory), samplers and data loaders for training and evaluation.

On CUDA the loaders are timm's: workers hand over uint8 images (`fast_collate`) and `PrefetchLoader` copies the
next batch to the GPU while the current one is used, normalising it (and random-erasing training images) there.
Elsewhere the workers normalise, as torchvision's pipeline does. Mixup/CutMix runs on the device either way, on
normalised images (mixing commutes with the per-channel normalisation, so this equals mixing the raw images).
"""
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, DistributedSampler

from .datasets import IndexedDataset, build_dataset, infer_dataset_kind
from .errors import UserError


def resolve_data_settings(args, model, dataset):
    """timm's data config for `model`, with the dataset's mean/std unless --mean/--std are given."""
    overrides = dict(vars(args))
    overrides["mean"] = args.mean or dataset.mean
    overrides["std"] = args.std or dataset.std
    if args.img_size:
        overrides["input_size"] = (3, args.img_size, args.img_size)
    return resolve_data_config(overrides, model=model)


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
    # Workers are not persistent: each epoch's workers are seeded from the main RNG, which a resumed run
    # restores, so augmentations after --resume match an uninterrupted run.
    common = dict(num_workers=args.workers, pin_memory=env.device.type == "cuda")
    train_loader = DataLoader(IndexedDataset(train_set), batch_size=args.batch_size, sampler=train_sampler, drop_last=True,
                              collate_fn=_collate_label_and_index if prefetch else None, **common)
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
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda", collate_fn=fast_collate if prefetch else None)
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
