"""Model creation through timm (custom_model/ registered first) and state-dict loading.

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
import timm
import torch
from huggingface_hub.errors import EntryNotFoundError
from timm.models import clean_state_dict, get_pretrained_cfg_value, parse_model_name

import custom_model  # noqa: F401  (registers extra architectures with timm)

from .errors import UserError

HUB_CACHE_HINT = ("the files in the local Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub); "
                  "with HF_HUB_OFFLINE=1 only that cache is read: fill it once on a machine with internet")

RATE_FLAGS = {"drop_rate": "--drop", "drop_path_rate": "--drop-path", "drop_block_rate": "--drop-block"}


def is_hub_name(name):
    """Whether timm fetches `name` from the Hugging Face Hub ('hf-hub:timm/resnet18.a1_in1k')."""
    try:
        return parse_model_name(name)[0] == "hf-hub"
    except ValueError:  # names timm refuses are reported by create_model
        return False


def create_model(name, num_classes, img_size=None, pretrained_path="", **kwargs):
    """timm.create_model with `img_size` passed only to architectures that take it.

    `name` is a timm registry name or an 'hf-hub:' name (its config comes from the hub or the local HF cache).
    `pretrained_path` loads a local file as timm's pretrained weights (see `pretrained_file_overlay`).
    Distilled models (DeiT, LeViT, EfficientFormer: two heads) keep timm's default of returning the mean of
    both heads in train mode too, so every loss sees one logits tensor, the same one evaluation scores.
    """
    hub = is_hub_name(name)
    if not hub and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise UserError(f"unknown model {name!r}; timm names such as {', '.join(close) or 'resnet18'} "
                        f"(python -c \"import timm; print(timm.list_models('*vit*'))\" lists them), or a Hugging "
                        f"Face Hub name such as hf-hub:timm/resnet18.a1_in1k")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if pretrained_path:
        if hub:
            raise UserError(f"--pretrained-path loads a file into a timm architecture, but the model is the hub "
                            f"name {name!r}; pass its architecture name (e.g. resnet18) as the model instead")
        pretrained_state = extract_state_dict(read_checkpoint(pretrained_path, "--pretrained-path file"),
                                              pretrained_path)
        kwargs.update(pretrained=True,
                      pretrained_cfg_overlay=pretrained_file_overlay(name, pretrained_path, pretrained_state))
    try:
        model = _create(name, num_classes, img_size, kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, EntryNotFoundError) as exc:
        message = _creation_failure(name, exc, kwargs.get("pretrained"), pretrained_path)
        if message is None:
            raise
        raise UserError(message) from None
    if pretrained_path:
        check_pretrained_coverage(model, name, num_classes, pretrained_path, pretrained_state)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(False)  # timm's default today; pinned, the losses need one logits tensor
    return model


def _create(name, num_classes, img_size, kwargs):
    """timm.create_model; an option the architecture lacks is left out when it asks for nothing (`img_size`,
    a zero drop rate) and refused with a UserError otherwise."""
    kwargs = dict(kwargs, img_size=img_size) if img_size else dict(kwargs)
    while True:
        try:
            return timm.create_model(name, num_classes=num_classes, **kwargs)
        except TypeError as exc:
            unsupported = next((k for k in kwargs if f"'{k}'" in str(exc)), None)
            if unsupported is None:
                raise
            if unsupported == "img_size" or (unsupported in RATE_FLAGS and not kwargs[unsupported]):
                del kwargs[unsupported]  # an architecture without that option: fine when it asks for nothing
                continue
            fix = (f"drop {RATE_FLAGS[unsupported]} or set it to 0" if unsupported in RATE_FLAGS
                   else "remove it from --model-kwargs")
            raise UserError(f"model {name!r} takes no argument {unsupported}={kwargs[unsupported]!r}; {fix}") from None


def _creation_failure(name, exc, pretrained, pretrained_path):
    """The UserError message for a model timm could not build; None when the input is not the cause."""
    reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    if type(exc).__module__.startswith("huggingface_hub"):
        fallback = "; or drop --pretrained / start from a local file with --pretrained-path" if pretrained else ""
        return (f"could not fetch {name!r}{' and its pretrained weights' if pretrained else ''} from the Hugging "
                f"Face Hub ({reason}); check the name, and that this machine reaches huggingface.co or has "
                f"{HUB_CACHE_HINT}{fallback}")
    if pretrained_path:
        return (f"--pretrained-path {pretrained_path!r} does not fit {name!r} ({reason}); it must hold weights of "
                f"this architecture (timm resizes position embeddings and windows to the input size, and "
                f"re-initialises a head of another class count)")
    if pretrained:
        return (f"could not load timm's pretrained weights for {name!r} ({reason}); they download from the "
                f"internet: drop --pretrained, or start from a local file with --pretrained-path or "
                f"--initial-checkpoint")
    return None


def pretrained_file_overlay(name, path, state):
    """timm's pretrained-cfg overlay that makes `pretrained=True` read the local file `path` (whose weights,
    read already, are `state`): the architecture's checkpoint filter then adapts them (position embeddings and
    windows resized to the input size), and timm re-initialises the classifier when the class count differs
    (timm prefers the file's EMA weights where it has them).

    timm drops the classifier whenever the model's class count differs from the cfg's `num_classes`; the
    registry's value (1000 for ImageNet weights) would also drop the matching head of a fine-tuned file, so
    the overlay carries the file's own head width.
    """
    overlay = {"file": os.path.abspath(path)}
    try:
        heads = get_pretrained_cfg_value(name, "classifier")
    except RuntimeError:  # an architecture registered without a pretrained cfg: timm's default cfg applies
        heads = None
    heads = (heads,) if isinstance(heads, str) else tuple(heads or ())
    widths = {state[f"{head}.weight"].shape[0] for head in heads if f"{head}.weight" in state}
    if len(widths) == 1:
        overlay["num_classes"] = widths.pop()
    return overlay


def check_pretrained_coverage(model, name, num_classes, path, state):
    """Refuse a --pretrained-path file that left any weight besides the classifier unset.

    When timm re-initialises the head it loads the rest non-strictly, so a file of another architecture would
    load nothing at all, silently; its keys, through the architecture's checkpoint filter, must cover the model.
    """
    cfg = getattr(model, "pretrained_cfg", {})
    if not cfg.get("classifier") or cfg.get("num_classes") == num_classes:
        return  # timm loaded strictly: every key matched
    state = in_timm_layout(state, model) or state
    heads = {weight.rsplit(".", 1)[0] for weight in _classifier_weight_names(model)}
    missing = sorted(k for k in model.state_dict() if k not in state and k.rsplit(".", 1)[0] not in heads)
    if missing:
        raise UserError(f"--pretrained-path {path!r} does not fit {name!r} "
                        f"(missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); it must hold "
                        f"weights of this architecture")


def recorded_args(checkpoint):
    """The training arguments a checkpoint records, as a dict: ours store a dict, timm train.py's an
    argparse.Namespace; {} for a plain state dict."""
    recorded = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(recorded, argparse.Namespace):
        recorded = vars(recorded)
    return recorded if isinstance(recorded, dict) else {}


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def embedding_dim(model):
    """Width of the pooled pre-logits vector (`forward_head(..., pre_logits=True)`)."""
    return getattr(model, "head_hidden_size", None) or model.num_features


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
        raise UserError(f"cannot read {label} {path!r} as a PyTorch file (torch.load, weights_only=True) or a "
                        f".safetensors file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


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


def _classifier_weight_names(model):
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
    state = extract_state_dict(read_checkpoint(path) if checkpoint is None else checkpoint, path, use_ema)
    state = convert_layout(state, model)
    own = model.state_dict()
    for head in _classifier_weight_names(model):
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
