"""Training views keyed by the sample: every random choice of a training image is a function of (run seed, epoch,
dataset index, repeat number), whatever the process count, batch size, loader workers or device.

A loader key is `(epoch, index, repeat)` (`KeyedSampler`). From it `KeyedViews`, in the loader's workers:
- seeds torch's, numpy's and Python's global RNGs for the transform (crop, flip, colour jitter, RandAugment);
- draws the random-erasing rectangles and their noise on the CPU (`KeyedErasing`);
- under `--mixup-pairing sample`, draws the partner, lambda, mode and box (`SampleMixing`) and loads the partner's
  own view of that epoch (a second decode of the sample's loading cost).
Workers hand over uint8 images. On the device (CPU or CUDA alike) `ViewBatch.to_batch` normalises them with
timm's prefetcher formula, pastes the erasing noise and mixes each image with its partner (sample pairing) or with
its mirror in the batch (timm's `Mixup`, `--mixup-pairing batch`).
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from kdcore.batch import Batch

_UINT64 = (1 << 64) - 1


def view_seeds(seed: int, epoch: int, index: int, repeat: int = 0) -> np.ndarray:
    """Four uint32 seeds of one view: torch's, numpy's and Python's RNG for the transform, and one for mixing.

    They depend on (run seed, epoch, dataset index, repeat number) only, through numpy's SeedSequence (four
    independent words, so no two generators replay one another's stream)."""
    return np.random.SeedSequence([seed & _UINT64, epoch, index, repeat]).generate_state(4)


@contextlib.contextmanager
def seeded_rngs(seeds, restore: bool):
    """torch's (CPU), numpy's and Python's global RNGs seeded from `seeds[:3]`; with `restore`, as they were after."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if restore else None
    torch.random.default_generator.manual_seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    random.seed(int(seeds[2]))
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class KeyedSampler(Sampler):
    """A process's keys `(epoch, index, repeat)` for an epoch, from `sampler` (DistributedSampler or timm's
    RepeatAugSampler), able to start part-way into the epoch (a mid-epoch resume skips the keys trained on).

    Under `--aug-repeats R`, timm's RepeatAugSampler lays each index out R times in a row before it pads and
    deals the list to the processes, so the element at global position p is repeat p mod R of its index (padding
    repeats the list's head, whose repeat numbers it keeps)."""

    def __init__(self, sampler, repeats: int = 0):
        self.sampler, self.repeats = sampler, repeats
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        """The epoch's order; `start`: how many of its keys were already trained on (skipped)."""
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def _repeat(self, position):
        if not self.repeats:
            return 0
        return (self.sampler.rank + position * self.sampler.num_replicas) % self.repeats

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                yield self.epoch, int(index), self._repeat(position)

    def __len__(self):
        return len(self.sampler) - self.start


class KeyedErasing:
    """timm's random erasing (`--reprob`, `--remode`, `--recount`) drawn per sample on the CPU, from the RNGs the
    sample's key seeded: with probability `probability`, 1 to `max_count` rectangles of 2% to 1/3 of the image
    (aspect 0.3 to 1/0.3, ten tries each), filled with normal noise per pixel (`pixel`), per channel (`rand`) or
    zeros (`const`), in normalised units. Returns `(top, left, height, width, noise)` per rectangle."""

    def __init__(self, probability: float, mode: str = "pixel", max_count: int = 1, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3):
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"random erasing mode {mode!r}: use pixel, rand or const")
        self.probability, self.mode, self.max_count = probability, mode, max(1, max_count)
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def draw(self, channels: int, height: int, width: int) -> list[tuple]:
        if self.probability <= 0 or random.random() > self.probability:
            return []
        count = 1 if self.max_count == 1 else random.randint(1, self.max_count)
        rectangles = []
        for _ in range(count):
            for _attempt in range(10):
                area = random.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if h < height and w < width:
                    top, left = random.randint(0, height - h), random.randint(0, width - w)
                    rectangles.append((top, left, h, w, self._noise(channels, h, w)))
                    break
        return rectangles

    def _noise(self, channels, h, w):
        if self.mode == "pixel":
            return torch.empty(channels, h, w).normal_()
        if self.mode == "rand":
            return torch.empty(channels, 1, 1).normal_()
        return torch.zeros(channels, 1, 1)


class SampleMixing:
    """Mixup/CutMix of `--mixup-pairing sample`: each sample's partner, lambda, mode and box are drawn from the
    mixing seed of its own key, so they depend on (seed, epoch, index, repeat) only.

    The flags mean what they mean for timm's `Mixup` in its per-element mode: with probability `prob` a sample is
    mixed; with both alphas set, CutMix is chosen with probability `switch_prob`; lambda ~ Beta(alpha, alpha),
    and a CutMix lambda is corrected to the pasted box's area (or, with `cutmix_minmax`, the box's side is drawn
    between those fractions of the image's and lambda follows from its area). The partner is any other sample of
    the dataset, uniformly."""

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, cutmix_minmax=None, prob: float = 1.0,
                 switch_prob: float = 0.5, off_epoch: int = 0):
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_minmax = mixup_alpha, cutmix_alpha, cutmix_minmax
        if cutmix_minmax is not None:
            self.cutmix_alpha = 1.0  # as timm: the box is drawn from the min/max fractions, not from lambda
        self.prob, self.switch_prob, self.off_epoch = prob, switch_prob, off_epoch

    def enabled(self, epoch: int) -> bool:
        return not self.off_epoch or epoch < self.off_epoch

    def draw(self, rng: np.random.Generator, index: int, size: int, height: int, width: int):
        """`(partner, lam, box)` of one sample: `box` is (top, bottom, left, right), empty for Mixup; a sample
        that is not mixed has itself as partner and lam 1."""
        partner = int(rng.integers(size - 1)) if size > 1 else index
        partner += partner >= index and size > 1  # any sample but itself
        mixed = rng.random() < self.prob
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not mixed:
            return index, 1.0, (0, 0, 0, 0)
        if not use_cutmix:
            return partner, lam, (0, 0, 0, 0)
        box = self._box(rng, lam, height, width)
        top, bottom, left, right = box
        return partner, 1.0 - (bottom - top) * (right - left) / (height * width), box

    def _box(self, rng, lam, height, width):
        if self.cutmix_minmax is not None:
            low, high = self.cutmix_minmax
            h = int(rng.integers(int(height * low), int(height * high)))
            w = int(rng.integers(int(width * low), int(width * high)))
            top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            return top, top + h, left, left + w
        ratio = math.sqrt(1 - lam)
        h, w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        return (min(max(cy - h // 2, 0), height), min(max(cy + h // 2, 0), height),
                min(max(cx - w // 2, 0), width), min(max(cx + w // 2, 0), width))


def _as_uint8_tensor(image):
    image = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if image.dtype != torch.uint8:
        raise TypeError(f"a training transform must hand over uint8 images (timm's use_prefetcher), got {image.dtype}")
    return image


class KeyedViews(Dataset):
    """The training view of each loader key `(epoch, index, repeat)` of `dataset` (whose transform yields uint8
    images), with its erasing rectangles and, under sample pairing, its partner's view and mixing parameters.

    In the main process (--workers 0) the global RNG states are restored after each sample, so loading data never
    shifts the training step's own draws (timm's batch mixup, dropout)."""

    def __init__(self, dataset, seed: int, erasing: Optional[KeyedErasing] = None,
                 mixing: Optional[SampleMixing] = None):
        self.dataset, self.seed, self.erasing, self.mixing = dataset, seed, erasing, mixing

    def __len__(self):
        return len(self.dataset)

    def view(self, epoch, index, repeat):
        """(uint8 image, label, erasing rectangles) of one index at one epoch, and its four seeds."""
        seeds = view_seeds(self.seed, epoch, index, repeat)
        with seeded_rngs(seeds, restore=get_worker_info() is None):
            image, label = self.dataset[index]
            image = _as_uint8_tensor(image)
            rectangles = self.erasing.draw(*image.shape) if self.erasing is not None else []
        return (image, int(label), rectangles), seeds

    def __getitem__(self, key):
        epoch, index, repeat = key
        view, seeds = self.view(epoch, index, repeat)
        if self.mixing is None or not self.mixing.enabled(epoch):
            return (epoch, index), view, None
        _, height, width = view[0].shape
        partner, lam, box = self.mixing.draw(np.random.default_rng(seeds[3]), index, len(self), height, width)
        partner_view = view if partner == index else self.view(epoch, partner, repeat)[0]
        return (epoch, index), view, (partner, partner_view, lam, box)


@dataclass
class ViewBatch:
    """A collated batch of `KeyedViews` samples (of one epoch); with partners, `images` holds the B views then the
    B partners'.

    - `erase`: (M, 6) int64 rows (image row, top, left, height, width, noise offset) and `noise`, their noise
      values laid end to end;
    - under sample pairing: `partner_index`, `partner_labels`, `lam` (B,) and `boxes` (B, 4) (top, bottom, left,
      right; empty for Mixup)."""
    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    erase: torch.Tensor
    noise: torch.Tensor
    epoch: int = 0
    partner_index: Optional[torch.Tensor] = None
    partner_labels: Optional[torch.Tensor] = None
    lam: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None

    def _map(self, fn):
        return ViewBatch(**{f.name: getattr(self, f.name) if not isinstance(getattr(self, f.name), torch.Tensor)
                            else fn(getattr(self, f.name)) for f in fields(self)})

    def pin_memory(self):
        return self._map(torch.Tensor.pin_memory)

    def to(self, device) -> ViewBatch:
        """On `device`, but for `erase`, which stays on the CPU (it is read row by row)."""
        moved = self._map(lambda t: t.to(device, non_blocking=True))
        moved.erase = self.erase
        return moved

    def __len__(self):
        return len(self.index)


def collate_views(samples) -> ViewBatch:
    """One `ViewBatch` from `KeyedViews` samples (run in the loader's workers)."""
    views = [view for _, view, _ in samples]
    paired = samples[0][2] is not None
    if paired:
        views += [mixing[1] for _, _, mixing in samples]
    erase, noise, offset = [], [], 0
    for row, (_, _, rectangles) in enumerate(views):
        for top, left, h, w, values in rectangles:
            erase.append((row, top, left, h, w, offset))
            noise.append(values.flatten())
            offset += values.numel()
    batch = ViewBatch(images=torch.stack([image for image, _, _ in views]),
                      labels=torch.tensor([label for _, label, _ in views[:len(samples)]]),
                      index=torch.tensor([index for (_, index), _, _ in samples]), epoch=samples[0][0][0],
                      erase=torch.tensor(erase, dtype=torch.int64).reshape(-1, 6),
                      noise=torch.cat(noise) if noise else torch.zeros(0))
    if paired:
        batch.partner_index = torch.tensor([mixing[0] for _, _, mixing in samples])
        batch.partner_labels = torch.tensor([label for _, label, _ in views[len(samples):]])
        batch.lam = torch.tensor([mixing[2] for _, _, mixing in samples], dtype=torch.float32)
        batch.boxes = torch.tensor([mixing[3] for _, _, mixing in samples], dtype=torch.int64)
    return batch


class DeviceLoader:
    """`loader`'s `ViewBatch`es on `device`. With `side_stream`, on CUDA, the next batch is copied on a side stream
    while the current one trains, as timm's PrefetchLoader does."""

    def __init__(self, loader, device, side_stream: bool = False):
        self.loader, self.device = loader, torch.device(device)
        self.side_stream = side_stream and self.device.type == "cuda"

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if not self.side_stream:
            for views in self.loader:
                yield views.to(self.device)
            return
        stream, current = torch.cuda.Stream(), None
        for views in self.loader:
            with torch.cuda.stream(stream):
                views = views.to(self.device)
            if current is not None:
                yield current
            torch.cuda.current_stream().wait_stream(stream)
            for f in fields(views):  # copied on the side stream, used on this one: not to be reused before
                tensor = getattr(views, f.name)
                if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                    tensor.record_stream(torch.cuda.current_stream())
            current = views
        if current is not None:
            yield current


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images as float, (x - 255 mean) / (255 std) per channel: timm's prefetcher formula."""
    shape = (1, -1, 1, 1)
    mean = torch.tensor([255 * m for m in mean], device=images.device).view(shape)
    std = torch.tensor([255 * s for s in std], device=images.device).view(shape)
    return images.float().sub_(mean).div_(std)


def paste_erasing(images: torch.Tensor, erase: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`images` (normalised) with the erasing rectangles of `ViewBatch.erase` filled with their noise, in place."""
    channels = images.shape[1]
    rows = erase.tolist()
    ends = [row[5] for row in rows[1:]] + [noise.numel()]
    for (row, top, left, h, w, offset), end in zip(rows, ends):
        values = noise[offset:end]
        values = values.view(channels, h, w) if values.numel() == channels * h * w else values.view(channels, 1, 1)
        images[row, :, top:top + h, left:left + w] = values
    return images


def mix_with_partners(images: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor,
                      boxes: torch.Tensor) -> torch.Tensor:
    """Each image blended with its partner (Mixup: lam x + (1 - lam) x_partner) or with the partner's box pasted
    in (CutMix: `boxes` rows (top, bottom, left, right), non-empty)."""
    _, _, height, width = images.shape
    top, bottom, left, right = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    has_box = ((bottom > top) & (right > left)).view(-1)
    weight = torch.where(has_box, torch.ones_like(lam), lam).view(-1, 1, 1, 1).to(images.dtype)
    blended = weight * images + (1 - weight) * partners
    ys = torch.arange(height, device=images.device).view(1, -1, 1)
    xs = torch.arange(width, device=images.device).view(1, 1, -1)
    inside = ((ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)).unsqueeze(1)
    return torch.where(inside, partners, blended)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's mixup targets of hard labels: `1 - smoothing + smoothing / K` on the class, `smoothing / K` off it."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1 - smoothing + off)


def batch_of(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, batch_mixup=None) -> Batch:
    """The `Batch` of normalised images, mixed by timm's batch Mixup (each image with its mirror) if given."""
    if batch_mixup is None:
        return Batch(images=images, targets=labels, labels=labels, index=index)
    images, targets, mixed_labels, lam = batch_mixup(images, labels)
    return Batch(images=images, targets=targets, labels=mixed_labels, index=index, lam=lam,
                 partner_index=index.flip(0))


class BatchBuilder:
    """A `ViewBatch` on the training device to the distiller's `Batch`: normalised, erased and mixed.

    `batch_mixup` (timm's `Mixup`, `--mixup-pairing batch`) mixes each image with its mirror in the batch; under
    `--mixup-pairing sample` (`sample_pairing`) the views come with their partners and are mixed with them, and
    targets are soft (label-smoothed) even where a sample was not mixed, as timm's `Mixup` gives them."""

    def __init__(self, mean, std, num_classes: int, batch_mixup=None, sample_pairing: bool = False,
                 smoothing: float = 0.0, channels_last: bool = False):
        self.mean, self.std, self.num_classes = mean, std, num_classes
        self.batch_mixup, self.sample_pairing, self.smoothing = batch_mixup, sample_pairing, smoothing
        self.channels_last = channels_last

    def __call__(self, views: ViewBatch) -> Batch:
        images = paste_erasing(normalise(views.images, self.mean, self.std), views.erase, views.noise)
        size = len(views)
        labels, index = views.labels, views.index
        if views.partner_index is not None:
            lam = views.lam.view(-1, 1)
            images = mix_with_partners(images[:size], images[size:], views.lam, views.boxes)
            targets = (lam * smoothed_one_hot(labels, self.num_classes, self.smoothing)
                       + (1 - lam) * smoothed_one_hot(views.partner_labels, self.num_classes, self.smoothing))
            batch = Batch(images=images, targets=targets, labels=targets.argmax(dim=1), index=index, lam=lam,
                          partner_index=views.partner_index)
        elif self.sample_pairing:  # --mixup-off-epoch reached
            batch = Batch(images=images, targets=smoothed_one_hot(labels, self.num_classes, self.smoothing),
                          labels=labels, index=index)
        else:
            batch = batch_of(images, labels, index, self.batch_mixup)
        batch.epoch = views.epoch
        if self.channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
        return batch
