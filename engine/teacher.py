"""Frozen sources (the teacher; later a second one such as CLIP): built once, eval() forever, no gradients,
never in DDP, never checkpointed, each with its own precision, input normalisation and size."""
import types
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from .errors import UserError
from .features import extract_features
from .models import create_model, load_weights
from .precision import TEACHER_DTYPES, autocast_factory, resolve_teacher_precision


@dataclass(frozen=True)
class InputSpec:
    """How a model's input batch is normalised and sized: per-channel mean and std, (height, width)."""
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    size: Tuple[int, int]

    @classmethod
    def of_data_config(cls, config):
        """A model's input as timm's data config describes it (mean, std, input_size)."""
        return cls.of(config["mean"], config["std"], config["input_size"])

    def with_overrides(self, mean=None, std=None, size=None):
        """This spec with any of mean, std, size replaced (flags left unset keep the student's)."""
        return InputSpec.of(mean or self.mean, std or self.std, size or self.size)

    @classmethod
    def of(cls, mean, std, size):
        size = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        if any(s <= 0 for s in std):
            raise UserError(f"input std {tuple(std)} must be positive in every channel")
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std), size)


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

    def __call__(self, images):
        """The requested `Features`, fp32 copies usable by autograd outside this call."""
        with torch.inference_mode():
            features = self.features(images)
        return features.detached_float()

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
