"""Reading and loading weights files: state dicts, training checkpoints (ours and timm's), safetensors.

Every file of weights goes through `load_weights` (the teacher's --teacher-pretrained, the student's
--initial-checkpoint, validate.py --checkpoint, RichKD's second source, tools/build_cache.py), reading it with
`read_checkpoint`: .pth/.pth.tar files with torch.load(weights_only=True) plus exactly `argparse.Namespace` (the
type timm's train.py stores its arguments as), .safetensors files with safetensors. timm's `clean_state_dict`
strips DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes. timm's own `load_state_dict` is not used for
reading: it returns the weights alone (validate.py reads the recorded arguments next to them), falls back to the
plain weights when EMA weights are asked for but absent, and does not know this repo's 'student' entry.
"""
import argparse
import os
import pickle
import sys

import safetensors.torch
import torch
from timm.models import clean_state_dict

from kdcore.errors import UnreadableFile, UserError


def recorded_args(checkpoint):
    """The training arguments a checkpoint records, as a dict: ours store a dict, timm train.py's an
    argparse.Namespace; {} for a plain state dict."""
    recorded = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(recorded, argparse.Namespace):
        recorded = vars(recorded)
    return recorded if isinstance(recorded, dict) else {}


def read_checkpoint(path, label="checkpoint"):
    """The contents of a .safetensors file, or of a PyTorch file read with weights_only=True.

    Safe loading stays on: besides tensors and plain containers, only `argparse.Namespace` may be unpickled
    (timm's train.py stores its arguments as one in every checkpoint), and only during this call.
    """
    if not path or not os.path.isfile(path):
        raise UserError(f"{label} not found: {path!r}; pass the path of an existing .pth, .pth.tar or "
                        f".safetensors file")
    try:
        if str(path).endswith(".safetensors"):
            return safetensors.torch.load_file(path, device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and safetensors errors come in many types
        refused = _refused_types(path) if isinstance(exc, pickle.UnpicklingError) else []
        if refused:
            raise UserError(f"{label} {path!r} holds Python objects other than tensors, containers and "
                            f"argparse.Namespace ({', '.join(refused[:6])}): refused, as unpickling them (torch.load "
                            f"without weights_only=True) can run arbitrary code; where you trust the file, re-save "
                            f"only its weights, e.g. torch.save(model.state_dict(), 'weights.pth')") from None
        if os.path.getsize(path) == 0:
            raise UnreadableFile(f"{label} {path!r} is empty (0 bytes), perhaps from a write that was cut short; "
                                 f"pass a complete file") from None
        first_line = (str(exc).strip().splitlines() or ["no message"])[0][:200]
        raise UnreadableFile(f"cannot read {label} {path!r} as a PyTorch file (torch.load, weights_only=True) or "
                             f"a .safetensors file ({type(exc).__name__}: {first_line}); it may be truncated: pass "
                             f"a complete file") from None


def _refused_types(path):
    """The types weights_only=True refuses in a PyTorch zip file, as 'module.Name' (read, not unpickled); empty
    when there are none or the file is no readable zip (then it is not a checkpoint at all)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip file: reported as unreadable
        return []
    return [name for name in names if name != "argparse.Namespace"]


def extract_state_dict(checkpoint, path, use_ema=False):
    """The model weights in a raw state dict, {'state_dict': ...} (timm's train.py), {'model': ...} or one of
    our files, without DDP (`module.`) or torch.compile (`_orig_mod.`) prefixes."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path!r} holds a {type(checkpoint).__name__}, not a state dict")
    keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model", "student")
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    else:
        if use_ema:
            raise UserError(f"{path!r} has no EMA weights (no 'state_dict_ema' entry); drop --use-ema/"
                            f"--use-ema-teacher or train with --model-ema")
        state = checkpoint
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path!r} does not look like model weights (non-tensor entries)")
    return clean_state_dict(state)


def classifier_weight_names(model):
    """The weight names of the model's classifiers: one, or two for distilled models (a tuple of heads)."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    return [f"{name}.weight" for name, module in model.named_modules() if any(module is h for h in heads)]


def in_timm_layout(state, model):
    """`state` through timm's `checkpoint_filter_fn` of the model's architecture module; None when the
    architecture has no filter or the filter fails on this layout."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return None
    try:
        return filter_fn(dict(state), model)
    except Exception:  # filters fail on foreign layouts in their own ways; callers report the file as it is
        return None


def convert_layout(state, model):
    """`state` in this timm's layout for `model`, through timm's `checkpoint_filter_fn` of the model's
    architecture module (e.g. timm 0.6.x Swin: downsample at the end of a stage, `head.*`, mask buffers).

    Returned unchanged when its keys already match, when the architecture has no filter, or when the
    filtered keys still do not match (the caller then reports the mismatch of the file as it is).
    """
    own = model.state_dict()
    if set(state) == set(own):
        return state
    converted = in_timm_layout(state, model)
    return converted if converted is not None and set(converted) == set(own) else state


def load_weights(model, path, model_name, use_ema=False, role="model", checkpoint=None):
    """Strictly load `path` (or its already-read `checkpoint`) into `model`, converting an older timm layout
    of the same architecture first; errors name the mismatch and fix. The one loading path for every file
    of weights (teacher, --initial-checkpoint, validate.py, RichKD's source, the cache tool)."""
    if checkpoint is None:
        checkpoint = read_checkpoint(path, label=f"{role} checkpoint")
    state = extract_state_dict(checkpoint, path, use_ema)
    state = convert_layout(state, model)
    own = model.state_dict()
    for head in classifier_weight_names(model):
        if head in state and head in own and state[head].shape[0] != own[head].shape[0]:
            raise UserError(f"{role} checkpoint {path!r} has a {state[head].shape[0]}-class head but "
                            f"{model_name!r} was built with {own[head].shape[0]} classes; set --num-classes "
                            f"{state[head].shape[0]} or use a checkpoint fine-tuned for {own[head].shape[0]} "
                            f"classes")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        details = "; ".join(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("shape mismatch", wrong_shape)) if keys)
        raise UserError(f"{role} checkpoint {path!r} does not match architecture {model_name!r} ({details}); "
                        f"check the model name, --num-classes and --img-size it was trained with")
    model.load_state_dict(state, strict=True)
    return model
