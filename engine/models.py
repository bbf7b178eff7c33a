"""Model creation through timm (custom_model/ registered first) and state-dict loading."""
import os
import sys

import timm
import torch

import custom_model  # noqa: F401  (registers extra architectures with timm)

from .errors import UserError


RATE_FLAGS = {"drop_rate": "--drop", "drop_path_rate": "--drop-path", "drop_block_rate": "--drop-block"}


def create_model(name, num_classes, img_size=None, **kwargs):
    """timm.create_model; an option the architecture lacks is left out when it asks for nothing (`img_size`,
    a zero drop rate) and refused with a UserError otherwise."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise UserError(f"unknown model {name!r}; timm names such as {', '.join(close) or 'resnet18'} "
                        f"(python -c \"import timm; print(timm.list_models('*vit*'))\" lists them)")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if img_size:
        kwargs["img_size"] = img_size
    while True:
        try:
            return _create_timm_model(name, num_classes, kwargs)
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


def _create_timm_model(name, num_classes, kwargs):
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not kwargs.get("pretrained"):
            raise
        raise UserError(f"could not load timm's pretrained weights for {name!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]}); they download from the internet: drop --pretrained "
                        f"or start from a local file with --initial-checkpoint") from None


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def embedding_dim(model):
    """Width of the pooled pre-logits vector (`forward_head(..., pre_logits=True)`)."""
    return getattr(model, "head_hidden_size", None) or model.num_features


def read_checkpoint(path):
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path!r}; pass the path of an existing .pth/.pth.tar file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise UserError(f"cannot read checkpoint {path!r} as a PyTorch file with weights_only=True "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def extract_state_dict(checkpoint, path, use_ema=False):
    """The model weights in a raw state dict, {'state_dict': ...}, {'model': ...} or one of our files."""
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
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _classifier_weight_name(model):
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return f"{name}.weight"
    return None


def convert_layout(state, model):
    """`state` in this timm's layout for `model`, through timm's `checkpoint_filter_fn` of the model's
    architecture module (e.g. timm 0.6.x Swin: downsample at the end of a stage, `head.*`, mask buffers).

    Returned unchanged when its keys already match, when the architecture has no filter, or when the
    filtered keys still do not match (the caller then reports the mismatch of the file as it is).
    """
    own = model.state_dict()
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if set(state) == set(own) or filter_fn is None:
        return state
    try:
        converted = filter_fn(dict(state), model)
    except Exception:  # filters fail on foreign layouts in their own ways; load_weights reports the file as it is
        return state
    return converted if set(converted) == set(own) else state


def load_weights(model, path, model_name, use_ema=False, role="model", checkpoint=None):
    """Strictly load `path` (or its already-read `checkpoint`) into `model`, converting an older timm layout
    of the same architecture first; errors name the mismatch and fix."""
    state = extract_state_dict(read_checkpoint(path) if checkpoint is None else checkpoint, path, use_ema)
    state = convert_layout(state, model)
    own = model.state_dict()
    head = _classifier_weight_name(model)
    if head in state and head in own and state[head].shape[0] != own[head].shape[0]:
        raise UserError(f"{role} checkpoint {path!r} has a {state[head].shape[0]}-class head but {model_name!r} "
                        f"was built with {own[head].shape[0]} classes; set --num-classes "
                        f"{state[head].shape[0]} or use a checkpoint fine-tuned for {own[head].shape[0]} classes")
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
