"""Augmentation keyed by the sample (engine/views.py): a sample's view at an epoch depends on (seed, epoch, index,
repeat) alone, so it is the same for any process count, batch size, worker count and loader path; under
--mixup-pairing sample so are its partner, lambda and box. Cached rows are mixed with the rows of the images their
image was mixed with, in both pairing modes."""
import math
import random
import types

import numpy as np
import pytest
import timm
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing

from distillers import DISTILLERS
from engine.config import parse_args_with_config
from engine.datasets import ArrayImageDataset
from engine.loader import build_batch_builder, build_loaders, load_datasets, resolve_data_settings
from engine.sources import CachedSource
from engine.train_args import build_train_parser
from engine.views import KeyedErasing, KeyedSampler, normalise, paste_erasing, view_seeds
from kdcore.distributed import DistEnv
from kdcore.features import Features

CLASSES, SIZE, EPOCH = 10, 48, 1
AUGMENTED = ["--dataset", "synthetic", "--synthetic-train-size", str(SIZE), "--synthetic-val-size", "8",
             "--img-size", "32", "--aa", "rand-m9-mstd0.5", "--color-jitter", "0.4", "--reprob", "0.5",
             "--recount", "2", "--mixup", "0.8", "--cutmix", "1.0", "--mixup-pairing", "sample", "--seed", "5"]


def parse(*argv):
    return parse_args_with_config(build_train_parser(DISTILLERS), [str(a) for a in argv])


@pytest.fixture(scope="module")
def model():
    return timm.create_model("test_vit", img_size=32, num_classes=CLASSES)


def epoch_views(model, batch_size, world_size=1, workers=0, prefetch=False, extra=()):
    """Per dataset index: what the loader handed over for it at EPOCH (its uint8 view, erasing rectangles, partner,
    lambda and box, and the partner's view as it came in the batch) and what the step trains on (the normalised,
    erased, mixed image and its soft target), over every process of the layout."""
    args = parse(*AUGMENTED, *extra, "-b", batch_size, "--workers", workers)
    samples = {}
    for rank in range(world_size):
        _, train_set, val_set = load_datasets(args)
        config = resolve_data_settings(args, model, train_set)
        loader, _ = build_loaders(args, DistEnv(rank=rank, world_size=world_size), train_set, val_set, config,
                                  prefetch=prefetch)
        builder = build_batch_builder(args, config, CLASSES)
        loader.sampler.set_epoch(EPOCH)
        for views in loader:
            batch = builder(views)
            size = len(views)
            for k, index in enumerate(views.index.tolist()):
                assert index not in samples, "each sample once per epoch"
                samples[index] = dict(
                    view=views.images[k], partner_view=views.images[size + k], label=int(views.labels[k]),
                    partner=int(views.partner_index[k]), partner_label=int(views.partner_labels[k]),
                    lam=float(views.lam[k]), box=tuple(views.boxes[k].tolist()),
                    erase=sorted(tuple(r[1:5]) for r in views.erase.tolist() if r[0] == k),
                    image=batch.images[k], target=batch.targets[k])
    assert sorted(samples) == list(range(SIZE))
    return samples


@pytest.fixture(scope="module")
def reference(model):
    return epoch_views(model, 16)


def assert_same_views(expected, got, normalised_atol=0.0):
    for index, sample in expected.items():
        other = got[index]
        assert torch.equal(sample["view"], other["view"]), index
        assert torch.equal(sample["partner_view"], other["partner_view"]), index
        assert (sample["partner"], sample["lam"], sample["box"], sample["erase"]) == (
            other["partner"], other["lam"], other["box"], other["erase"]), index
        torch.testing.assert_close(other["image"], sample["image"], rtol=0, atol=normalised_atol)
        assert torch.equal(sample["target"], other["target"]), index


@pytest.mark.parametrize("layout", [dict(world_size=2, batch_size=8), dict(batch_size=8),
                                    dict(batch_size=16, workers=2), dict(batch_size=16, prefetch=True)],
                         ids=["2-processes", "batch-8", "2-workers", "prefetcher"])
def test_a_sample_gets_the_same_view_in_any_layout(model, reference, layout):
    batch_size = layout.pop("batch_size")
    assert_same_views(reference, epoch_views(model, batch_size, **layout))


def test_the_reference_epoch_exercises_every_random_choice(reference):
    """So that the layout test compares something: views differ, rectangles are erased, both modes mix."""
    boxes = [s["box"] for s in reference.values()]
    assert any(b[1] > b[0] for b in boxes) and any(b == (0, 0, 0, 0) and s["lam"] < 1
                                                   for b, s in zip(boxes, reference.values()))
    assert sum(bool(s["erase"]) for s in reference.values()) >= SIZE // 4
    assert all(s["partner"] != i for i, s in reference.items())


def test_the_partner_enters_with_its_own_view_and_label(reference):
    for sample in reference.values():
        partner = reference[sample["partner"]]
        assert torch.equal(sample["partner_view"], partner["view"]) and sample["partner_label"] == partner["label"]


def test_lambda_box_and_target_follow_timms_definitions(reference):
    """CutMix's lambda is the share of the image's own pixels left; the soft target is timm's mixup_target of the
    pair (label smoothing 0.1)."""
    for sample in reference.values():
        top, bottom, left, right = sample["box"]
        if bottom > top:
            assert sample["lam"] == pytest.approx(1 - (bottom - top) * (right - left) / 32 ** 2, abs=1e-6)
        pair = torch.tensor([sample["label"], sample["partner_label"]])
        expected = mixup_target(pair, CLASSES, sample["lam"], smoothing=0.1)[0]
        torch.testing.assert_close(sample["target"], expected, rtol=0, atol=1e-6)


def test_views_differ_by_epoch_and_by_repeat(model):
    args = parse(*AUGMENTED, "-b", 8, "--workers", 0)
    _, train_set, val_set = load_datasets(args)
    loader, _ = build_loaders(args, DistEnv(), train_set, val_set, resolve_data_settings(args, model, train_set))
    views = loader.dataset
    first = views.view(1, 3, 0)[0][0]
    assert torch.equal(first, views.view(1, 3, 0)[0][0])
    assert not torch.equal(first, views.view(2, 3, 0)[0][0]) and not torch.equal(first, views.view(1, 3, 1)[0][0])
    assert (view_seeds(5, 1, 3, 0) != view_seeds(5, 1, 3, 1)).all()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_repeated_augmentation_numbers_each_repeat_of_an_index_apart(world_size):
    """timm's RepeatAugSampler lays out R copies of each index in a row, then deals the list to the processes:
    with one process the copies come in a row, numbered 0..R-1; with R processes each process holds one repeat
    of every index, so process r's are all repeat r; in any layout the copies of an index never share a number.
    (An epoch holds as many samples as the dataset, as DeiT's sampler: about N / R indices, R times each.)"""
    dataset, repeats = list(range(30)), 3
    keys = []
    for rank in range(world_size):
        sampler = KeyedSampler(RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=repeats,
                                                selected_round=0), repeats)
        sampler.set_epoch(4)
        keys.append(list(sampler))
    if world_size == 1:
        copies = {}
        for _, index, repeat in keys[0]:
            assert repeat == copies.get(index, -1) + 1
            copies[index] = repeat
    if world_size == repeats:
        assert all(repeat == rank for rank, rank_keys in enumerate(keys) for _, _, repeat in rank_keys)
    pairs = [(index, repeat) for rank_keys in keys for _, index, repeat in rank_keys]
    assert len(pairs) == len(set(pairs)) == world_size * math.ceil(len(dataset) / world_size)
    assert all(epoch == 4 for rank_keys in keys for epoch, _, _ in rank_keys)


def test_a_resumed_sampler_skips_the_keys_trained_on():
    sampler = KeyedSampler(torch.utils.data.DistributedSampler(list(range(20)), num_replicas=1, rank=0, seed=3))
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start=7)
    assert list(sampler) == whole[7:] and len(sampler) == 13


def test_normalisation_agrees_with_torchvisions_formula():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(normalise(images, mean, std).double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode, count", [("pixel", 1), ("rand", 3), ("const", 2)])
def test_erasing_draws_timms_rectangles_and_noise(mode, count):
    """From the same RNG states, KeyedErasing draws what timm's RandomErasing (the CPU transform's) writes."""
    for seed in range(20):
        image = torch.randn(3, 24, 20)
        random.seed(seed)
        torch.manual_seed(seed)
        expected = RandomErasing(0.7, mode=mode, max_count=count, device="cpu")(image.clone())
        random.seed(seed)
        torch.manual_seed(seed)
        rectangles = KeyedErasing(0.7, mode, count).draw(3, 24, 20)
        erase, noise, offset = [], [], 0
        for top, left, h, w, values in rectangles:
            erase.append((0, top, left, h, w, offset))
            noise.append(values.flatten())
            offset += values.numel()
        got = paste_erasing(image[None].clone(), torch.tensor(erase, dtype=torch.int64).reshape(-1, 6),
                            torch.cat(noise) if noise else torch.zeros(0))[0]
        assert torch.equal(got, expected), seed


def constant_images(count, size=16):
    """Image i is uniformly grey at level 5 i: its index can be read back from any mix of it."""
    images = np.repeat((5 * np.arange(count, dtype=np.uint8))[:, None, None], size * size, axis=1)
    return images.reshape(count, size, size)


@pytest.mark.parametrize("pairing, flags", [("batch", ["--mixup-mode", "batch"]), ("batch", ["--mixup-mode", "elem"]),
                                            ("sample", [])])
def test_cached_rows_are_mixed_with_the_rows_of_the_images_mixed_in(model, pairing, flags):
    """A cache whose row of index i is the grey level of image i: the mixed row must equal the mean grey level of
    the mixed image, Mixup and CutMix alike."""
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    args = parse("--dataset", "synthetic", "--img-size", "16", "--no-aug", "--mixup", "0.8", "--cutmix", "1.0",
                 "--mixup-pairing", pairing, *flags, "-b", 8, "--workers", 0, "--seed", 1)
    levels = 5 * torch.arange(SIZE, dtype=torch.float32)
    train_set = ArrayImageDataset(constant_images(SIZE), np.arange(SIZE) % CLASSES, CLASSES, "made", mean, std)
    val_set = ArrayImageDataset(constant_images(8), np.arange(8) % CLASSES, CLASSES, "made", mean, std)
    config = resolve_data_settings(args, model, train_set)
    loader, _ = build_loaders(args, DistEnv(), train_set, val_set, config)
    builder = build_batch_builder(args, config, CLASSES)
    source = CachedSource(types.SimpleNamespace(lookup=lambda index: Features(logits=levels[index][:, None])))
    mixed = 0
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for views in loader:
            batch = builder(views)
            grey = batch.images[:, 0].mean(dim=(1, 2)) * 255 * std[0] + 255 * mean[0]
            rows = source(batch).logits[:, 0]
            torch.testing.assert_close(rows, grey, rtol=0, atol=1e-3)
            mixed += int((rows != levels[batch.index]).sum())
    assert mixed > SIZE, "most images must have been mixed with another"


def test_sample_pairing_needs_no_even_batch(model):
    args = parse(*AUGMENTED, "-b", 5, "--workers", 0)
    _, train_set, val_set = load_datasets(args)
    config = resolve_data_settings(args, model, train_set)
    loader, _ = build_loaders(args, DistEnv(), train_set, val_set, config)
    batch = build_batch_builder(args, config, CLASSES)(next(iter(loader)))
    assert batch.images.shape == (5, 3, 32, 32) and batch.targets.shape == (5, CLASSES)
    assert math.isclose(float(batch.targets.sum()), 5.0, rel_tol=1e-6)
