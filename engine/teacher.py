"""The frozen teacher: built once, eval() forever, no gradients, never in DDP, never checkpointed."""
import contextlib

import torch

from .errors import UserError
from .features import extract_features
from .models import create_model, load_weights

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class FrozenTeacher:
    """Deliberately not an nn.Module: a distiller's .train(), .state_dict() and DDP cannot reach it."""

    def __init__(self, model, request, device, precision="fp32", compile=False, grad_context=torch.inference_mode):
        self.model = model.to(device).eval().requires_grad_(False)
        self.request, self.device = request, device
        self.dtype = PRECISIONS[precision]
        self.grad_context = grad_context  # the benchmark swaps in no_grad/enable_grad to measure the lever
        self._extract = torch.compile(extract_features) if compile else extract_features

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def __call__(self, images):
        with self.grad_context(), self._autocast():
            features = self._extract(self.model, images, self.request)
        return features.detached_float()

    def predict(self, images):
        with torch.inference_mode(), self._autocast():
            return self.model(images).float()


def build_teacher_model(args, num_classes, img_size):
    """The teacher architecture with its checkpoint loaded (strict); None when there is no teacher."""
    if not args.teacher:
        return None
    model = create_model(args.teacher, num_classes=num_classes, img_size=img_size)
    if not args.teacher_pretrained:
        raise UserError(f"--teacher {args.teacher} needs --teacher-pretrained PATH (its fine-tuned checkpoint, "
                        f"see pretrained/README.md); a randomly initialised teacher teaches nothing")
    return load_weights(model, args.teacher_pretrained, args.teacher, use_ema=args.use_ema_teacher, role="teacher")
