"""Frozen sources: the teacher and any second source a distiller declares (RichKD's), each built here from its
flags, once; eval() forever, no gradients, never in DDP, never checkpointed, each with its own precision, input
normalisation and size.

A source is called with the step's `Batch` and returns `Features` (fp32, usable by autograd), so a live model
(`FrozenSource`) and a cache read (`CachedSource`) look alike to the loop; `describe(stages)` gives its widths and
stage layouts (`OutputInfo`) for the distiller's construction.
"""
import types

import torch
import torch.nn.functional as F

from custom_forward.staged import staged_forward
from kdcore.errors import UserError
from kdcore.features import Features, extract_features
from kdcore.precision import TEACHER_DTYPES, autocast_factory, resolve_teacher_precision
from kdcore.sources import InputSpec
from kdcore.stages import OutputInfo, describe_model

from .cache import SourceCache, mix_rows
from .models import create_model
from .weights import load_weights


def _stay_in_eval(model, mode=True):
    return model


class FrozenSource:
    """A frozen model that students learn from. Deliberately not an nn.Module: a distiller's .train(),
    .state_dict() and DDP cannot reach it; its model's own train() is disabled, so a parent module that
    holds the model cannot flip it either.

    Batches arrive normalised and sized for the student (`student_input`); each is remapped to the
    source's own statistics and size (`source_input`) first: x * std_s + mean_s, then (x - mean_t) / std_t,
    then a bilinear resize (antialiased when shrinking). When both specs agree the batch passes untouched.
    """

    def __init__(self, model, request, device, precision="fp32", student_input=None, source_input=None,
                 compile=False):
        device = torch.device(device)
        self.model = model.to(device).eval().requires_grad_(False)
        self.model.train = types.MethodType(_stay_in_eval, self.model)
        self.request, self.device = request, device
        self.precision, _ = resolve_teacher_precision(precision, device)
        self._autocast = autocast_factory(device, TEACHER_DTYPES[self.precision])
        self._extract = torch.compile(extract_features) if compile else extract_features
        self.input = source_input or student_input
        self._renormalise = self._resize = False
        if student_input is not None and source_input is not None:
            def column(values):
                return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self._renormalise = (student_input.mean, student_input.std) != (source_input.mean, source_input.std)
            self._resize = student_input.size != source_input.size
            self._student_mean, self._student_std = column(student_input.mean), column(student_input.std)
            self._mean, self._std = column(source_input.mean), column(source_input.std)

    def remap(self, images):
        """A student-normalised batch as this source expects it; `images` itself when nothing differs.

        The same remapping as timm's DistillationTeacher.normalize_input, which lives on an nn.Module
        wrapper; one line here keeps the source a plain object.
        """
        if self._renormalise:
            images = (images * self._student_std + self._student_mean - self._mean) / self._std
        if self._resize:
            shrink = images.shape[-2] > self.input.size[0] or images.shape[-1] > self.input.size[1]
            images = F.interpolate(images, size=self.input.size, mode="bilinear", align_corners=False,
                                   antialias=shrink)
        return images

    def features(self, images):
        """The requested features, as computed (autocast dtype, under the caller's autograd mode)."""
        images = self.remap(images)
        with self._autocast():
            return self._extract(self.model, images, self.request)

    def __call__(self, batch):
        """The requested `Features` of the step's (mixed) batch, fp32 copies usable by autograd outside this call."""
        return self.of_images(batch.images)

    def of_images(self, images):
        """The requested `Features` of a student-normalised image batch (fp32, usable by autograd)."""
        with torch.inference_mode():
            features = self.features(images)
        return features.detached_float()

    def staged_pass(self, images, hooks):
        """The model run again on a student-normalised batch, `hooks[k]` acting where paper stage k begins
        (custom_forward/staged.py): `Features` (logits, stages 1-4) under the caller's autograd mode, so gradients
        reach what the hooks add while the weights stay frozen, and in this source's precision whatever autocast
        the caller is under (PAT's prompted teacher)."""
        images = self.remap(images)
        with torch.autocast(self.device.type, enabled=False), self._autocast():
            final, stages = staged_forward(self.model, images, hooks)
            return Features(logits=self.model.forward_head(final), stages=stages)

    def describe(self, stages):
        """Its `OutputInfo`: widths, and the layouts of `stages` by a dry run at its own input size."""
        if self.input is None:
            raise ValueError("a FrozenSource built without an input spec cannot be described; pass student_input")
        return describe_model(self.model, (3, *self.input.size), stages)

    def predict(self, images):
        """fp32 logits of a student-normalised batch (to score the source on the student's loader)."""
        with torch.inference_mode():
            images = self.remap(images)
            with self._autocast():
                return self.model(images).float()


def build_frozen_teacher(args, teacher_model, request, device, student_data_config):
    """The frozen teacher of a run: its precision (args.teacher_precision, already resolved or 'auto'),
    its input spec from the teacher flags, channels_last and compile as for the student."""
    student_input = InputSpec.of_data_config(student_data_config)
    teacher_input = student_input.with_overrides(getattr(args, "teacher_mean", None),
                                                 getattr(args, "teacher_std", None),
                                                 getattr(args, "teacher_img_size", None))
    if getattr(args, "channels_last", False):
        teacher_model.to(memory_format=torch.channels_last)
    return FrozenSource(teacher_model, request, device, args.teacher_precision, student_input=student_input,
                        source_input=teacher_input, compile=args.compile)


def build_teacher_model(args, num_classes, img_size):
    """The teacher architecture (at --teacher-img-size, else `img_size`) with its checkpoint loaded (strict);
    None when there is no teacher."""
    if not args.teacher:
        return None
    model = create_model(args.teacher, num_classes=num_classes,
                         img_size=getattr(args, "teacher_img_size", None) or img_size)
    if not args.teacher_pretrained:
        raise UserError(f"--teacher {args.teacher} needs --teacher-pretrained PATH (its fine-tuned checkpoint, "
                        f"see pretrained/README.md); a randomly initialised teacher teaches nothing")
    return load_weights(model, args.teacher_pretrained, args.teacher, use_ema=args.use_ema_teacher, role="teacher")


class CachedSource:
    """A source read from a cache (tools/build_cache.py): the rows of the batch's dataset indices, mixed as the
    images were (lam * row + (1 - lam) * the row of `Batch.partner_index`: the mirror in the batch, or the
    sample's own partner), standing in for the source's output on the mixed image, which was never computed."""

    def __init__(self, cache):
        self.cache = cache

    def describe(self, stages):
        if stages:
            raise UserError(f"cache {self.cache.path!r} holds no stage maps (stages {list(stages)} requested); "
                            f"use a live source instead")
        widths = self.cache.meta["widths"]
        return OutputInfo(embedding_width=widths.get("embedding"), logits_width=widths.get("logits"))

    def __call__(self, batch):
        rows = self.cache.lookup(batch.index)
        if batch.partner_index is None:
            return rows
        partners = self.cache.lookup(batch.partner_index)
        return Features(*(None if x is None else mix_rows(x, p, batch.lam)
                          for x, p in ((rows.logits, partners.logits), (rows.embedding, partners.embedding))))


def build_extra_source(args, spec, distiller_name, train_labels, student_data_config, device):
    """The second source a distiller declares (`SourceSpec`), from its flags: a `CachedSource` (PREFIX-cache) or a
    live `FrozenSource` (PREFIX-source, PREFIX-source-pretrained, PREFIX-source-mean/std/img-size), in the
    teacher's precision, checked against the run."""
    request = spec.request
    needs = [k for k, wanted in (("logits", request.logits), ("embedding", request.embedding)) if wanted]
    cache, model_name = spec.value(args, "cache"), spec.value(args, "source")
    if bool(cache) == bool(model_name):
        raise UserError(f"--distiller {distiller_name} needs one {spec.role}: {spec.flag('cache')} DIR "
                        f"(tools/build_cache.py) or {spec.flag('source')} MODEL {spec.flag('source-pretrained')} PATH")
    if cache:
        if train_labels is None:
            raise UserError(f"{spec.flag('cache')} needs the class of every training sample to check the cache "
                            f"against")
        source_cache = SourceCache(cache)
        source_cache.check(train_labels, needs, args.num_classes)
        return CachedSource(source_cache)
    pretrained = spec.value(args, "source-pretrained")
    if not pretrained:
        raise UserError(f"{spec.flag('source')} {model_name} needs {spec.flag('source-pretrained')} PATH (its "
                        f"trained checkpoint); a randomly initialised source teaches nothing")
    student_input = InputSpec.of_data_config(student_data_config)  # PREFIX-source-* default to it
    source_input = student_input.with_overrides(spec.value(args, "source-mean"), spec.value(args, "source-std"),
                                                spec.value(args, "source-img-size"))
    model = create_model(model_name, num_classes=args.num_classes, img_size=source_input.size[0])
    load_weights(model, pretrained, model_name, role=spec.role)
    return FrozenSource(model, request, device, args.teacher_precision, student_input=student_input,
                        source_input=source_input, compile=args.compile)


def build_extra_sources(args, distiller_cls, train_labels, student_data_config, device):
    """{SourceSpec.name: source} of every second source the distiller declares for these arguments."""
    return {spec.name: build_extra_source(args, spec, distiller_cls.name, train_labels, student_data_config, device)
            for spec in distiller_cls.extra_sources(args)}
