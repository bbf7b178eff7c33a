"""The teacher read from a cache of its outputs on every epoch's training views (`--teacher-cache DIR`).

A view is a function of (augmentation seed, epoch, dataset index) (engine/views.py), mixup partner, lambda and box
included under `--mixup-pairing sample`, so the teacher's output on the image a student sees can be computed once,
by `tools/build_cache.py --views augmented` with the runs' own config and flags, and read by any number of runs,
processes and batch sizes. The cache's fingerprint holds everything that decides those outputs; a run checks every
item of it and refuses a cache that differs in any, naming the field.
"""
import datetime
import os
import platform
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from kdcore.errors import EXIT_PREEMPTED, Preempted, UserError
from kdcore.features import FeatureRequest
from kdcore.io import file_sha256
from kdcore.machine import cpu_model_name
from kdcore.sources import InputSpec
from kdcore.stages import OutputInfo

from .cache import ARRAYS, PARTIAL_SUFFIX, CacheWriter, SourceCache, array_layout
from .loader import augmentation_seed
from .views import collate_views

# The flags that decide a training view (label smoothing only shapes targets, so it stays out; --mixup-mode only
# applies to batch pairing, which a cache cannot serve).
VIEW_FLAGS = ("no_aug", "scale", "ratio", "hflip", "vflip", "color_jitter", "aa", "aug_repeats", "reprob", "remode",
              "recount", "mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob", "mixup_off_epoch",
              "mixup_pairing")
TEACHER_FIELDS = ("teacher.name", "teacher.weights_sha256", "teacher.use_ema_teacher")  # checked when given


def refuse_uncacheable(args, flag="--teacher-cache"):
    """Views a cache keyed by (epoch, index) cannot hold."""
    if args.aug_repeats:
        raise UserError(f"{flag}: --aug-repeats {args.aug_repeats} decides which (index, repeat) views an epoch "
                        f"trains by the process count, so one cache cannot serve it; drop --aug-repeats")
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixing and args.mixup_pairing != "sample":
        raise UserError(f"{flag}: with mixup or cutmix only --mixup-pairing sample can be cached (batch pairing "
                        f"mixes each image with whichever image shares its batch); add --mixup-pairing sample")
    if args.compile:
        raise UserError(f"{flag}: the teacher's outputs under --compile are not what a cache holds; drop --compile")


def teacher_input(args, student_data_config):
    """The teacher's input spec, as build_frozen_teacher derives it from the student's."""
    student = InputSpec.of_data_config(student_data_config)
    return student.with_overrides(args.teacher_mean, args.teacher_std, args.teacher_img_size)


def fingerprint(args, student_data_config, teacher_precision, weights_sha256):
    """Everything that decides a cached teacher output, as nested dicts of JSON values."""
    spec = teacher_input(args, student_data_config)
    config = student_data_config
    return {
        "dataset": {"kind": args.dataset, "train_subset": args.train_subset,
                    "train_subset_seed": args.train_subset_seed, "holdout": args.holdout},
        "teacher": {"name": args.teacher, "weights_sha256": weights_sha256, "use_ema_teacher": args.use_ema_teacher,
                    "precision": teacher_precision, "channels_last": bool(args.channels_last),
                    "input": {"mean": list(spec.mean), "std": list(spec.std), "size": list(spec.size)}},
        "student_input": {"mean": [float(m) for m in config["mean"]], "std": [float(s) for s in config["std"]],
                          "input_size": list(config["input_size"]), "interpolation": config["interpolation"],
                          "crop_pct": config["crop_pct"]},
        "views": {**{flag: _json(getattr(args, flag)) for flag in VIEW_FLAGS}, "aug_seed": augmentation_seed(args)},
    }


def _json(value):
    return list(value) if isinstance(value, tuple) else value


def _flat(tree, prefix=""):
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            items.update(_flat(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def check_fingerprint(cache, ours, skip=()):
    """One clear error for the first field where the cache's fingerprint and the run's differ."""
    theirs, mine = _flat(cache.meta["source"]), _flat(ours)
    for key in sorted(set(theirs) | set(mine)):
        if key in skip or theirs.get(key) == mine.get(key):
            continue
        flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        raise UserError(f"teacher cache {cache.path!r} was built with {key} = {theirs.get(key)!r}, this run has "
                        f"{mine.get(key)!r} ({flag}); build a cache for this run with tools/build_cache.py "
                        f"--views augmented and the run's config and flags")


class CachedTeacher:
    """The teacher as a cache read: each step gets the rows of its batch's (epoch, dataset index) keys, the
    teacher's outputs on exactly those (mixed) views. No teacher model exists; widths come from the meta."""

    def __init__(self, cache):
        self.cache, self.check_report = cache, ""

    @property
    def metrics(self):
        """The teacher's validation figures measured when the cache was built."""
        return self.cache.meta["build"].get("teacher_eval")

    def describe(self, stages):
        if stages:
            raise UserError(f"teacher cache {self.cache.path!r} holds logits and pooled embeddings only; this "
                            f"distiller reads teacher stage maps {list(stages)}, which are never cached: train it "
                            f"with the live teacher (--teacher, --teacher-pretrained)")
        widths = self.cache.meta["widths"]
        return OutputInfo(embedding_width=widths.get("embedding"), logits_width=widths.get("logits"))

    def __call__(self, batch):
        return self.cache.lookup(batch.index, batch.epoch)


def open_teacher_cache(args, request, train_labels, student_data_config, teacher_precision, weights_sha256=None):
    """The run's `CachedTeacher`, after every check: format, views, dataset, fingerprint, epochs, what it holds."""
    refuse_uncacheable(args)
    cache = SourceCache(args.teacher_cache)
    if cache.views != "augmented":
        raise UserError(f"{args.teacher_cache!r} is a cache of clean views (a second source's); --teacher-cache "
                        f"needs one of augmented views: tools/build_cache.py --views augmented")
    needs = [k for k, wanted in (("logits", request.logits), ("embedding", request.embedding)) if wanted]
    CachedTeacher(cache).describe(request.stages)
    cache.check(train_labels, needs, args.num_classes)
    given = args.teacher and weights_sha256
    check_fingerprint(cache, fingerprint(args, student_data_config, teacher_precision, weights_sha256),
                      skip=() if given else TEACHER_FIELDS)
    if args.epochs > cache.meta["epochs"]:
        raise UserError(f"--epochs {args.epochs}: teacher cache {cache.path!r} covers {cache.meta['epochs']} "
                        f"epochs; build one with --epochs {args.epochs}")
    return CachedTeacher(cache)


# Building -------------------------------------------------------------------------------------------------------

def epoch_batches(first, size, batch_size):
    """Index batches over `first` .. `size` - 1 in order, each of `batch_size`; the last is padded with repeats of
    its last index (never a one-sample forward: fp32 outputs at batch 1 differ in the last bits on CPU).
    Returns (indices, number of real ones) pairs."""
    batches = []
    for start in range(first, size, batch_size):
        real = list(range(start, min(start + batch_size, size)))
        batches.append((real + [real[-1]] * (batch_size - len(real)), len(real)))
    return batches


def storage_bytes(epochs, size, widths, dtype, topk=None):
    """Bytes of a cache's arrays."""
    layout = array_layout({"widths": widths, "dtype": dtype, "topk": topk})
    return epochs * size * sum(np.dtype(d).itemsize * width for d, width in layout.values())


def check_disk(path, needed):
    """Print the storage a build needs; refuse it when the disk holding `path` has less free."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    print(f"the cache needs {needed / 2 ** 30:.2f} GiB; {folder!r} has {free / 2 ** 30:.2f} GiB free", flush=True)
    if free < needed:
        raise UserError(f"the cache needs {needed / 2 ** 30:.2f} GiB but {folder!r} has {free / 2 ** 30:.2f} GiB free; "
                        f"free space, choose another --teacher-cache folder, or cache fp16 logits only "
                        f"(--cache-topk K for many classes)")


def build_info(env, teacher_eval):
    """The meta's `build` fields: how the cache was built, and the teacher's validation figures."""
    return {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpu": cpu_model_name(),
            "processes": env.world_size, "threads": torch.get_num_threads(), "teacher_eval": teacher_eval}


def dry_run(views, builder, teacher, size, batch_size, loader_kwargs, epoch=0):
    """The build's loader, views and teacher forward over one epoch, writing nothing: (seconds, views)."""
    start = time.perf_counter()
    batches = epoch_batches(0, size, batch_size)
    loader = torch.utils.data.DataLoader(views, batch_sampler=[[(epoch, i, 0) for i in b] for b, _ in batches],
                                         collate_fn=collate_views, **loader_kwargs)
    for view_batch in tqdm(loader, total=len(batches), unit="batch", desc="dry run (nothing written)"):
        teacher(builder(view_batch.to(teacher.device)))
    return time.perf_counter() - start, size


def write_teacher_cache(path, views, builder, teacher, identity, source, widths, epochs, batch_size, dtype, env,
                        loader_kwargs, teacher_eval=None, barrier=None, topk=None, should_stop=None):
    """Write (or finish) the cache at `path`: for each epoch, every index's view in index order, in batches of
    `batch_size`, through `builder` (normalise, erase, mix) and `teacher`. Processes take the batches in turn,
    each writing its own rows; after every round of batches (one per process) they meet at `barrier` and the
    first records the progress, so a killed build resumes at the last finished round. After each recorded round
    `should_stop()` (a collective: the stop signals of any process) may end the build with `Preempted`; the
    same command continues it. Returns the path."""
    needed = storage_bytes(epochs, identity["size"], widths, dtype, topk)

    def open_writer():
        return CacheWriter(path, identity, source, widths, views="augmented", epochs=epochs, dtype=dtype,
                           build=build_info(env, teacher_eval), topk=topk)
    if env.rank == 0:  # creates (or checks) the partial build; the others open it after
        if not os.path.isdir(os.path.abspath(path) + PARTIAL_SUFFIX):
            check_disk(path, needed)
        writer = open_writer()
    if barrier is not None:
        barrier()
    if env.rank != 0:
        writer = open_writer()
    size, world = identity["size"], env.world_size
    bar = tqdm(total=writer.total, initial=writer.done, unit="view", disable=env.rank != 0,
               desc=f"caching teacher outputs ({needed / 2 ** 30:.2f} GiB, {epochs} epochs)")
    while writer.done < writer.total:
        epoch, first = divmod(writer.done, size)
        batches = epoch_batches(first, size, batch_size)
        mine = batches[env.rank::world]
        loader = iter(torch.utils.data.DataLoader(views, batch_sampler=[[(epoch, i, 0) for i in b] for b, _ in mine],
                                                  collate_fn=collate_views, **loader_kwargs))
        for round_start in range(0, len(batches), world):
            if round_start + env.rank < len(batches):
                indices, real = batches[round_start + env.rank]
                outputs = teacher(builder(next(loader).to(teacher.device)))
                writer.write_rows(epoch * size + indices[0], {key: getattr(outputs, key)[:real] for key in widths})
            if barrier is not None:
                barrier()
            last, real = batches[min(round_start + world, len(batches)) - 1]
            done = epoch * size + last[0] + real
            writer.meta["done"] = done
            if env.rank == 0:
                writer.mark_done(done)
                bar.update(done - bar.n)
            if should_stop is not None and should_stop():
                bar.close()
                raise Preempted(f"rank {env.rank}: the cache build stopped by a signal after {done} of "
                                f"{writer.total} views, all recorded in {path}{PARTIAL_SUFFIX}: run the same command "
                                f"again to continue (exit code {EXIT_PREEMPTED})")
    bar.close()
    return writer.finish() if env.rank == 0 else writer.path


def check_entries(cache, views, builder, teacher, count, batch_size, seed=0):
    """Recompute `count` random (epoch, index) entries with the live teacher; returns the largest deviation of
    each array relative to the largest magnitude of its live values, and the tolerance it must meet (fp32:
    1e-5, fp16: 1e-3)."""
    rng = np.random.default_rng(seed)
    epochs, size = cache.meta["epochs"], cache.meta["dataset"]["size"]
    picks = sorted({(int(rng.integers(epochs)), int(rng.integers(size))) for _ in range(count)})
    deviation = {}
    for epoch in sorted({e for e, _ in picks}):
        indices = [i for e, i in picks if e == epoch]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            keys = [(epoch, i, 0) for i in chunk + [chunk[-1]] * (max(batch_size, 2) - len(chunk))]
            outputs = teacher(builder(collate_views([views[k] for k in keys]).to(teacher.device)))
            cached = cache.lookup(torch.tensor(chunk), epoch)
            for key in cache.meta["widths"]:
                if getattr(outputs, key) is None:  # not requested from the live teacher
                    continue
                live = getattr(outputs, key)[:len(chunk)].float().cpu()
                diff = (getattr(cached, key).cpu() - live).abs().max().item()
                deviation[key] = max(deviation.get(key, 0.0), diff / max(live.abs().max().item(), 1e-12))
    tolerance = 1e-5 if cache.meta["dtype"] == "fp32" else 1e-3
    return deviation, tolerance


def cached_arrays(store):
    unknown = sorted(set(store) - set(ARRAYS))
    if unknown:
        raise UserError(f"--store {' '.join(unknown)}: a teacher cache holds {' and '.join(ARRAYS)}")
    return FeatureRequest(logits="logits" in store, embedding="embedding" in store)




def open_run_teacher_cache(args, data, distiller_cls):
    """`--teacher-cache`: the run's CachedTeacher, checked against the run (its teacher flags when given)."""
    weights_sha256 = file_sha256(args.teacher_pretrained) if args.teacher and args.teacher_pretrained else None
    request = distiller_cls.feature_requests(args)[1]
    cached = open_teacher_cache(args, request, data.train_labels, data.config, args.teacher_precision, weights_sha256)
    if not args.teacher:
        args.teacher = cached.cache.meta["source"]["teacher"]["name"]  # for the log and the run folder's name
    return cached


def check_run_teacher_cache(args, cached, live, views, builder):
    """`--check-cache N`: N random entries recomputed by the live teacher; refuses the run when one deviates."""
    deviation, tolerance = check_entries(cached.cache, views, builder, live, args.check_cache, args.batch_size)
    worst = max(deviation.values())
    cached.check_report = (f"--check-cache {args.check_cache}: largest deviation "
                           + ", ".join(f"{k} {v:.2e}" for k, v in deviation.items())
                           + f" of the largest value (tolerance {tolerance:g}, {cached.cache.meta['dtype']})")
    if worst > tolerance:
        raise UserError(f"teacher cache {cached.cache.path!r} does not hold this teacher's outputs: "
                        f"{cached.check_report}; rebuild it with tools/build_cache.py --views augmented")
