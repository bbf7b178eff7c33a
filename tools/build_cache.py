#!/usr/bin/env python3
"""Run a frozen source once over a training set and cache its per-sample outputs, for RichKD's second source.

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

Images are the clean training images in dataset order (no augmentation), preprocessed as the source expects:
open_clip's own transform for CLIP; for timm, the evaluation transform of validate.py at the model's input
size with the dataset's mean/std (--img-size/--mean/--std/--crop-pct override them). The cache is keyed by
dataset index and records the dataset's identity, so training refuses a cache of another dataset. A progress
bar shows the ETA; an interrupted run continues where it stopped when started again with the same arguments
(and batch size, for bit-identical rows), and the finished cache appears in one rename.
"""
import argparse
import os

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from engine.cache import ARRAYS, CacheWriter, dataset_identity
from engine.datasets import build_dataset, dataset_class_names, dataset_labels, infer_dataset_kind
from engine.loader import build_eval_transform, resolve_data_settings, worker_processes
from engine.models import create_model
from engine.plugins import add_import_argument, import_modules_of_command_line
from engine.sources import FrozenSource
from engine.train_args import add_data_arguments
from engine.weights import load_weights
from kdcore.errors import UserError, exit_cleanly_on_user_error
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
    with tqdm(total=len(dataset), initial=writer.done, unit="img", desc=f"caching {args.source}") as bar:
        for images, _ in loader:
            features = source.of_images(images.to(device))
            writer.write({k: getattr(features, k) for k in widths})
            bar.update(len(images))
    return writer.finish()


@exit_cleanly_on_user_error
def main(argv=None):
    import_modules_of_command_line(argv)  # before the parser: their datasets are valid --dataset choices
    path = build_cache(build_parser().parse_args(argv))
    print(f"cache written: {path}")


if __name__ == "__main__":
    main()
