#!/usr/bin/env python3
"""Run a frozen source once over a training set and cache its per-sample outputs: of the clean images for RichKD's
second source (`--views clean`, the default), or of every epoch's training views for `--teacher-cache`
(`--views augmented`).

    python tools/build_cache.py --views augmented -c configs/demo/rsd.yaml --mixup-pairing sample \
        --teacher-cache cache/demo_teacher [--cache-dtype fp32] [--store logits embedding] [--check-cache 64]
    python train.py -c configs/demo/rsd.yaml --mixup-pairing sample --teacher-cache cache/demo_teacher
    python tools/build_cache.py data/cifar100 --dataset cifar100 --source clip:ViT-L-14-quickgelu \
        --weights pretrained/clip_vit_large_patch14_openai.bin --output cache/cifar100_clip_vit_l14
    python tools/build_cache.py data/cifar100 --dataset cifar100 --source resnet50 \
        --weights pretrained/resnet50_cifar100.pth --output cache/cifar100_resnet50
    python train.py data/cifar100 ... --distiller richkd --richkd-cache cache/cifar100_clip_vit_l14

Sources:
- `clip:NAME`: an open_clip model (pip install open-clip-torch) with local weights only: `--weights` must be a
  file (a state dict or .safetensors in open_clip's layout, e.g. open_clip_pytorch_model.bin of the Hugging
  Face repo timm/vit_large_patch14_clip_224.openai); nothing is downloaded. OpenAI's weights need the QuickGELU
  config (`clip:ViT-L-14-quickgelu`). Logits are zero-shot: the cosine between the image embedding and each
  class's text embedding, the mean of the L2-normalised embeddings of the 12 prompt templates, renormalised
  (not multiplied by CLIP's logit scale). The embedding stored is the L2-normalised image embedding.
- any other name: a timm model (custom_model/ included) with its checkpoint; logits and the pooled pre-logits
  embedding, as the teacher gives them in training.

Augmented views (`--views augmented`) take the same config and flags as the runs the cache will serve, `--epochs`
the epochs it covers and `--teacher-cache` where it goes: each epoch's view of each index (engine/views.py: its
crop, flips, RandAugment, erasing and sample-paired mixup), remapped for the teacher as in training, at the runs'
per-process `-b`, in index order. `torchrun --nproc_per_node N tools/build_cache.py ...` shares the batches out.
The storage it needs is printed first (and refused when the disk lacks it); the build resumes per round of
batches; the teacher's validation top-1 is recorded for the runs' start-up report. Like train.py it stops on
--stop-signals after the current round (exit code 75; the same command continues it) and its processes wait
--dist-timeout for each other.

Clean images (`--views clean`) are the clean training images in dataset order (no augmentation), preprocessed as
the source expects: open_clip's own transform for CLIP; for timm, the evaluation transform of validate.py at the
model's input size with the dataset's mean/std (--img-size/--mean/--std/--crop-pct override them). The cache is keyed by
dataset index and records the dataset's identity, so training refuses a cache of another dataset. A progress
bar shows the ETA; an interrupted run continues where it stopped when started again with the same arguments
(and batch size, for bit-identical rows), and the finished cache appears in one rename.
"""
import argparse
import os
import sys

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from distillers import DISTILLERS
from engine.arg_ranges import check_ranges
from engine.cache import ARRAYS, DTYPES, VIEWS, CacheWriter, SourceCache, dataset_identity
from engine.config import parse_args_with_config
from engine.datasets import build_dataset, dataset_class_names, dataset_labels, infer_dataset_kind
from engine.loader import (
    augmentation_seed,
    build_batch_builder,
    build_erasing,
    build_eval_loader,
    build_eval_transform,
    build_sample_mixing,
    build_train_transform,
    load_datasets,
    resolve_data_settings,
    worker_processes,
)
from engine.loop import evaluate
from engine.models import create_model
from engine.plugins import add_import_argument, import_modules_of_command_line
from engine.preemption import DEFAULT_SIGNALS as DEFAULT_STOP_SIGNALS
from engine.preemption import stop_on_signals
from engine.run import input_size
from engine.sources import FrozenSource, build_frozen_teacher, build_teacher_model
from engine.teacher_cache import (
    CachedTeacher,
    cached_arrays,
    check_run_teacher_cache,
    dry_run,
    fingerprint,
    refuse_uncacheable,
    write_teacher_cache,
)
from engine.train_args import add_data_arguments, build_train_parser
from engine.views import KeyedViews
from engine.weights import load_weights
from kdcore.distributed import any_process, init_distributed
from kdcore.errors import EXIT_PREEMPTED, Preempted, UserError, exit_cleanly_on_error
from kdcore.features import FeatureRequest, Features, embedding_dim
from kdcore.io import file_sha256
from kdcore.precision import TEACHER_DTYPES, autocast_factory, default_device, resolve_teacher_precision

CLIP_PREFIX = "clip:"
# The RichKD paper's 12 prompt templates (its code's cache script), without a trailing period.
TEMPLATES = (
    "a photo of a {}", "a blurry photo of a {}", "a cropped photo of a {}", "a close-up photo of a {}",
    "a low resolution photo of a {}", "a bright photo of a {}", "a picture of a {}", "a detailed image of a {}",
    "a sketch of a {}", "a natural photo of a {} in the wild", "a realistic image of a {}",
    "a high quality photo of a {}",
)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    add_import_argument(p)
    p.add_argument("--num-classes", type=int, default=None, help="default: the dataset's")
    p.add_argument("--source", required=True, help="timm model name, or clip:NAME for an open_clip model")
    p.add_argument("--weights", required=True, help="the source's weights file (local; nothing is downloaded)")
    p.add_argument("--output", required=True, help="the cache folder to create")
    p.add_argument("--store", nargs="+", default=list(ARRAYS), choices=ARRAYS, help="what to cache per sample")
    p.add_argument("--class-names", default="", help="file with one class name per line, in label order "
                   "(default: the dataset's own; ImageNet folders need it for CLIP)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="forward precision")
    p.add_argument("--views", choices=VIEWS, default="clean", help="clean: the clean training images (RichKD's "
                   "second source); augmented: every epoch's training views (--teacher-cache; train.py's flags)")
    return p


def class_names(args, kind, dataset):
    """The dataset's class names in label order: --class-names, else those its registered kind gives; a kind
    without readable names (ImageNet-style folders, named by ids) falls back to its folder names or class indices,
    which CLIP's prompts cannot use."""
    if args.class_names:
        with open(args.class_names) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = dataset_class_names(kind, args.data_dir, dataset)
    if names is None:
        if args.source.startswith(CLIP_PREFIX):
            raise UserError(f"the {kind} dataset has no readable class names (ImageNet-style folders are named by "
                            f"ids): pass --class-names FILE (one readable name per line, in label order, i.e. the "
                            f"folders' sorted order) for CLIP's prompts")
        names = getattr(dataset, "classes", None) or [f"class {i}" for i in range(dataset.num_classes)]
    if len(names) != dataset.num_classes:
        raise UserError(f"{len(names)} class names for {dataset.num_classes} classes; fix --class-names")
    return names


class ClipZeroShot:
    """open_clip zero-shot classifier: `of_images(images) -> Features(logits, embedding)`, as FrozenSource's.

    Class embedding: normalise(mean over templates of normalise(text embedding of the prompt)); logits: the
    cosine between the normalised image embedding and each class embedding, without CLIP's logit scale.
    """

    def __init__(self, model, tokenizer, names, device, autocast):
        self.model, self.autocast = model.to(device).eval().requires_grad_(False), autocast
        with torch.inference_mode(), autocast():
            classes = []
            for name in names:
                text = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]).to(device)).float()
                classes.append(torch.nn.functional.normalize(text, dim=-1).mean(dim=0))
            self.class_embeddings = torch.nn.functional.normalize(torch.stack(classes), dim=-1)

    def of_images(self, images):
        with torch.inference_mode(), self.autocast():
            embedding = torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
        return Features(logits=embedding @ self.class_embeddings.t(), embedding=embedding)


def build_clip_source(args, names, device, precision):
    """(ClipZeroShot, its preprocessing transform, {array: width})."""
    try:
        import open_clip
    except ImportError:
        raise UserError("clip: sources need open_clip: pip install open-clip-torch==3.3.0") from None
    name = args.source[len(CLIP_PREFIX):]
    if args.img_size or args.input_size or args.mean or args.std or args.crop_pct:
        raise UserError("CLIP sources use open_clip's own preprocessing: drop --img-size/--input-size/--mean/--std/"
                        "--crop-pct")
    if not os.path.isfile(args.weights):
        raise UserError(f"CLIP weights not found at {args.weights!r}: place the {name} weights file there (open_clip "
                        f"state dict or .safetensors, e.g. open_clip_pytorch_model.bin of the Hugging Face repo "
                        f"timm/vit_large_patch14_clip_224.openai for ViT-L-14-quickgelu); nothing is downloaded")
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {name!r}; open_clip.list_models() names them, e.g. "
                        f"ViT-L-14-quickgelu")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=args.weights)
    except RuntimeError as exc:
        raise UserError(f"{args.weights!r} does not load into open_clip's {name}: {str(exc)[:300]}") from None
    source = ClipZeroShot(model, open_clip.get_tokenizer(name), names, device,
                          autocast_factory(device, TEACHER_DTYPES[precision]))
    return source, preprocess, {"logits": len(names), "embedding": source.class_embeddings.shape[1]}


def build_timm_source(args, dataset, num_classes, device, precision):
    """(FrozenSource giving logits and the pooled embedding, validate.py's eval transform, {array: width})."""
    model = create_model(args.source, num_classes=num_classes, img_size=args.img_size)
    load_weights(model, args.weights, args.source, role="source")
    request = FeatureRequest(embedding="embedding" in args.store, logits="logits" in args.store)
    transform = build_eval_transform(resolve_data_settings(args, model, dataset))
    return FrozenSource(model, request, device, precision), transform, {"logits": num_classes,
                                                                         "embedding": embedding_dim(model)}


def build_source(args, names, dataset, device):
    """(source with of_images(images) -> Features, transform, {array: width}, description recorded in the cache)."""
    precision, _ = resolve_teacher_precision(args.precision, device)
    if args.source.startswith(CLIP_PREFIX):
        source, transform, widths = build_clip_source(args, names, device, precision)
    else:
        source, transform, widths = build_timm_source(args, dataset, args.num_classes or dataset.num_classes,
                                                      device, precision)
    description = {"name": args.source, "weights": os.path.basename(args.weights),
                   "weights_sha256": file_sha256(args.weights), "precision": precision,
                   "preprocess": repr(transform)}
    if args.source.startswith(CLIP_PREFIX):
        description["templates"] = list(TEMPLATES)
    return source, transform, {k: widths[k] for k in args.store}, description


def build_cache(args):
    """Write (or finish) the cache of `args`; returns its folder."""
    device = torch.device(args.device)
    kind = args.dataset or infer_dataset_kind(args.data_dir)
    dataset = build_dataset(kind, args.data_dir, "train", args)
    names = class_names(args, kind, dataset)
    source, transform, widths, description = build_source(args, names, dataset, device)
    writer = CacheWriter(args.output, dataset_identity(dataset_labels(dataset), names), description, widths)
    dataset.transform = transform
    loader = DataLoader(Subset(dataset, range(writer.done, len(dataset))), batch_size=args.batch_size,
                        shuffle=False, **worker_processes(args.workers))
    with stop_on_signals(DEFAULT_STOP_SIGNALS) as stops, tqdm(total=len(dataset), initial=writer.done, unit="img",
                                                               desc=f"caching {args.source}") as bar:
        for images, _ in loader:
            features = source.of_images(images.to(device))
            writer.write({k: getattr(features, k) for k in widths})
            bar.update(len(images))
            if stops.requested:
                raise Preempted(f"the cache build stopped by {stops.requested} after {writer.done} of "
                                f"{len(dataset)} images, all recorded: run the same command again to continue "
                                f"(exit code {EXIT_PREEMPTED})")
    return writer.finish()


def build_augmented_parser():
    """train.py's parser (the served runs' config and flags) with the build's own options."""
    p = build_train_parser(DISTILLERS)
    g = p.add_argument_group("teacher-output cache (tools/build_cache.py --views augmented)")
    g.add_argument("--views", choices=VIEWS, default="augmented")
    g.add_argument("--cache-dtype", choices=tuple(DTYPES), default="fp16",
                   help="fp16 (the default: half the storage, within 1e-3) or fp32 (exact)")
    g.add_argument("--cache-topk", type=int, default=None, metavar="K",
                   help="keep the K largest logits of each view (and their log-sum-exp) instead of all: for large "
                   "class counts; read back approximately (engine/cache.py says how)")
    g.add_argument("--dry-run", action="store_true", help="run the build's loader and teacher over one epoch and "
                   "print its speed, writing nothing")
    g.add_argument("--store", nargs="+", default=["logits"], choices=ARRAYS,
                   help="what to cache per view (logits by default; add embedding for methods that read it)")
    return p


def build_augmented_cache(args):
    """The teacher's outputs on every epoch's training view: written to args.teacher_cache; returns its path."""
    check_ranges(args)
    env = init_distributed(args.device, args.local_rank, args.dist_timeout)
    refuse_uncacheable(args, "tools/build_cache.py --views augmented")
    if not (args.teacher_cache and args.teacher and args.teacher_pretrained):
        raise UserError("tools/build_cache.py --views augmented needs --teacher NAME --teacher-pretrained PATH and "
                        "--teacher-cache DIR (where the cache goes; the runs read it with the same flag)")
    args.teacher_precision, _ = resolve_teacher_precision(args.teacher_precision, env.device)
    kind, train_set, val_set = load_datasets(args)
    args.num_classes, args.dataset = args.num_classes or train_set.num_classes, kind
    student = create_model(args.model, num_classes=args.num_classes, img_size=input_size(args))
    config = resolve_data_settings(args, student, train_set)  # the student's input: the teacher sees it remapped
    train_set.transform = build_train_transform(args, config)
    views = KeyedViews(train_set, augmentation_seed(args), build_erasing(args), build_sample_mixing(args))
    teacher_model = build_teacher_model(args, args.num_classes, input_size(args))
    teacher = build_frozen_teacher(args, teacher_model, cached_arrays(args.store), env.device, config)
    val_loader = build_eval_loader(val_set, config, args.validation_batch_size or args.batch_size, args.workers,
                                   env.device, sampler=list(range(env.rank, len(val_set), env.world_size)))
    teacher_eval = evaluate(teacher.predict, val_loader, env)
    widths = {"logits": args.num_classes, "embedding": embedding_dim(teacher_model)}
    builder = build_batch_builder(args, config, args.num_classes)
    if args.dry_run:
        seconds, count = dry_run(views, builder, teacher, len(train_set), args.batch_size,
                                 worker_processes(args.workers))
        print(f"dry run: {count} views in {seconds:.1f} s ({count / seconds:.1f} views/s), nothing written")
        return None
    barrier = torch.distributed.barrier if env.distributed else None
    with stop_on_signals(args.stop_signals) as stops:
        return write_teacher_cache(
            args.teacher_cache, views, builder, teacher,
            dataset_identity(dataset_labels(train_set), []),
            fingerprint(args, config, args.teacher_precision, file_sha256(args.teacher_pretrained)),
            {k: widths[k] for k in args.store}, args.epochs, args.batch_size, args.cache_dtype, env,
            worker_processes(args.workers), teacher_eval={k: teacher_eval[k] for k in ("top1", "top5")},
            barrier=barrier, topk=args.cache_topk, should_stop=lambda: any_process(stops.requested is not None, env))


def check_built_cache(args, path):
    """--check-cache N after a build: N random entries recomputed by the live teacher."""
    cached = CachedTeacher(SourceCache(path))
    _, train_set, _ = load_datasets(args)
    student = create_model(args.model, num_classes=args.num_classes, img_size=input_size(args))
    config = resolve_data_settings(args, student, train_set)
    train_set.transform = build_train_transform(args, config)
    views = KeyedViews(train_set, augmentation_seed(args), build_erasing(args), build_sample_mixing(args))
    teacher = build_frozen_teacher(args, build_teacher_model(args, args.num_classes, input_size(args)),
                                   cached_arrays(args.store), args.device, config)
    check_run_teacher_cache(args, cached, teacher, views, build_batch_builder(args, config, args.num_classes))
    return cached.check_report


def views_of(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--views", choices=VIEWS, default="clean")
    return pre.parse_known_args(argv)[0].views


@exit_cleanly_on_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    import_modules_of_command_line(argv)  # before the parser: their datasets are valid --dataset choices
    if views_of(argv) == "augmented":
        args = parse_args_with_config(build_augmented_parser(), argv)
        path = build_augmented_cache(args)
        if path is None:
            return
        if args.check_cache and int(os.environ.get("RANK", "0")) == 0:
            print(check_built_cache(args, path))
    else:
        path = build_cache(build_parser().parse_args(argv))
    print(f"cache written: {path}")


if __name__ == "__main__":
    main()
