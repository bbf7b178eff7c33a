"""Model creation through timm, custom_model/ registered first: names, hub names, --pretrained-path files
(through timm's pretrained machinery, so its checkpoint filter adapts them), --model-kwargs and drop rates."""
import os

import timm
from huggingface_hub.errors import EntryNotFoundError
from timm.models import get_pretrained_cfg_value, parse_model_name

import custom_model  # noqa: F401  (registers extra architectures with timm)
from kdcore.errors import UserError

from .weights import classifier_weight_names, extract_state_dict, in_timm_layout, read_checkpoint

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
    heads = {weight.rsplit(".", 1)[0] for weight in classifier_weight_names(model)}
    missing = sorted(k for k in model.state_dict() if k not in state and k.rsplit(".", 1)[0] not in heads)
    if missing:
        raise UserError(f"--pretrained-path {path!r} does not fit {name!r} "
                        f"(missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); it must hold "
                        f"weights of this architecture")


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
