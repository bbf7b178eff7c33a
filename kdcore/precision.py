"""Precision choices in one place: the teacher's forward precision, the student's AMP dtype, the default
device, and the autocast contexts built from them."""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

from .errors import UserError

if TYPE_CHECKING:
    import argparse

TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # --teacher-precision; auto is resolved at start-up
TEACHER_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: no autocast
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # --amp-dtype


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: str | torch.device) -> tuple[bool, str]:
    """(True/False, what decides it): whether `device` computes bf16 in hardware rather than emulating it.

    Args:
        device: the device to ask about; CUDA asks the GPU, CPU probes for AMX and AVX512-BF16.

    Returns:
        Whether bf16 is native, and a sentence saying why (for the run's log and warnings).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return False, f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        for feature, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
            if getattr(torch.cpu, probe, lambda: False)():
                return True, f"this CPU computes bf16 natively ({feature})"
        return False, "this CPU has no native bf16 (no AMX/AVX512-BF16), bf16 would be emulated and ~4.5x slower"
    return False, f"no native-bf16 check for device type {device.type!r}"


def resolve_teacher_precision(precision: str, device: str | torch.device) -> tuple[str, str]:
    """(fp32|bf16|fp16, reason) for --teacher-precision on `device`.

    auto picks bf16 where the device computes it natively, fp32 otherwise. fp16 on CPU is refused; explicit
    bf16 on a device that would emulate it is kept, with a warning (once per process).

    Args:
        precision: the --teacher-precision value, one of `TEACHER_PRECISIONS`.
        device: the device the teacher runs on.

    Returns:
        The precision to use (a key of `TEACHER_DTYPES`) and a sentence saying why.

    Raises:
        UserError: for an unknown precision, or fp16 on CPU.
    """
    device = torch.device(device)
    if precision not in TEACHER_PRECISIONS:
        raise UserError(f"--teacher-precision {precision!r} is not one of {', '.join(TEACHER_PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--teacher-precision fp16 is not supported on CPU (no fp16 kernels, it would be slow "
                        "and overflow-prone); use --teacher-precision auto, bf16 or fp32")
    native, why = native_bf16(device)
    if precision == "auto":
        return ("bf16" if native else "fp32"), f"auto: {why}"
    if precision == "bf16" and not native:
        message = f"--teacher-precision bf16 on {device.type}: {why}; --teacher-precision auto would pick fp32"
        warnings.warn(message)  # issued from here, so shown once however often resolved
        return precision, message
    return precision, f"--teacher-precision {precision} as requested"


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], ContextManager[object]]:
    """A zero-argument callable giving the autocast context for `dtype` on `device` (None: no autocast)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def autocast_context(args: argparse.Namespace, device: torch.device) -> Callable[[], ContextManager[object]]:
    """Mixed precision for the student step (--amp, --amp-dtype): bf16 or fp16 on CUDA, bf16 on CPU.

    Args:
        args: the parsed flags; reads `amp` and `amp_dtype` (a key of `AMP_DTYPES`).
        device: the device the student runs on.

    Returns:
        A zero-argument callable giving a fresh autocast context (a null context without --amp).

    Raises:
        UserError: for --amp-dtype float16 on CPU.
    """
    if not args.amp:
        return contextlib.nullcontext
    dtype = AMP_DTYPES[args.amp_dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--amp-dtype float16 is not supported on CPU; use --amp-dtype bfloat16")
    return autocast_factory(device, dtype)
