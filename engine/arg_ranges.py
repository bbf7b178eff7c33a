"""The one place train.py's values are range-checked, before anything is built or created: each refusal names the
flag, the value and the range. (Checks that need the data or the models, such as whether the input size fits
the student, are made where those are built, still before the run folder exists.)"""
import math

import torch

from kdcore.errors import UserError

# flag dest: (lowest, highest, whether the highest itself is allowed); None: unbounded on that side
RANGES = {
    "lr": (0.0, None, True), "lr_base": (0.0, None, True), "warmup_lr": (0.0, None, True),
    "min_lr": (0.0, None, True), "weight_decay": (0.0, None, True), "momentum": (0.0, 1.0, True),
    "drop": (0.0, 1.0, False), "drop_path": (0.0, 1.0, False), "drop_block": (0.0, 1.0, False),
    "smoothing": (0.0, 1.0, False), "reprob": (0.0, 1.0, True), "hflip": (0.0, 1.0, True),
    "vflip": (0.0, 1.0, True), "mixup": (0.0, None, True), "cutmix": (0.0, None, True),
    "mixup_prob": (0.0, 1.0, True), "mixup_switch_prob": (0.0, 1.0, True), "model_ema_decay": (0.0, 1.0, True),
    "color_jitter": (0.0, None, True), "clip_grad": (0.0, None, True), "dist_timeout": (0.0, None, True),
    "img_size": (1, None, True), "validation_batch_size": (1, None, True), "workers": (0, None, True),
    "crop_pct": (0.0, 1.0, True), "log_interval": (1, None, True), "lr_base_size": (1, None, True),
}
POSITIVE = ("lr", "lr_base", "img_size", "dist_timeout", "crop_pct")  # 0 is out of range too


def flag(name):
    return "--" + name.replace("_", "-")


def _values(value):
    return value if isinstance(value, (list, tuple)) else [value]


def check_finite(args):
    """Every float value of the run (NaN and infinity reach the loss only after the warm-up)."""
    for name, value in vars(args).items():
        for item in _values(value):
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"{flag(name)} is {item}: give a finite number")


def _describe(low, high, high_ok, positive):
    if high is None:
        return f"{'greater than' if positive else 'at least'} {low}"
    return f"in [{low}, {high}{']' if high_ok else ')'}" if not positive else f"in ({low}, {high}]"


def check_ranges(args):
    check_finite(args)
    for name, (low, high, high_ok) in RANGES.items():
        for item in _values(getattr(args, name, None)):
            if item is None:
                continue
            positive = name in POSITIVE
            if item < low or (positive and item == low) or (high is not None and (item > high or
                                                                                  (item == high and not high_ok))):
                raise UserError(f"{flag(name)} {item:g} is out of range: it must be "
                                f"{_describe(low, high, high_ok, positive)}")
    for name in ("mean", "std"):
        values = getattr(args, name)
        if values is not None and len(values) not in (1, 3):
            raise UserError(f"{flag(name)} takes 1 value (for every channel) or 3 (R G B), got {len(values)}: "
                            f"{' '.join(f'{v:g}' for v in values)}")
    if args.std is not None and min(args.std) <= 0:
        raise UserError(f"--std values must be positive, got {' '.join(f'{v:g}' for v in args.std)}")
    check_device(args.device)


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to this process (torch.cuda.is_available() is "
                        f"False); use --device cpu, or check CUDA_VISIBLE_DEVICES and the driver")
