"""A teacher's forward cut where the paper's stages begin, so that a hook can act there: PAT's prompted teacher.

`staged_forward(model, x, hooks)` runs the model's own modules in timm's order and returns what `stage_features`
returns (the final features and {paper stage: tensor in the stage table's layout}); before the blocks of each
paper stage k in `hooks`, it hands the tensor there to `hooks[k]` as an NCHW map (patch tokens only: prefix
tokens pass through untouched) and continues from the map the hook returns. With no hook, or hooks returning
their input, the outputs equal `stage_features`' exactly.

Where stage k begins, per family (the place PAT's official code inserts its prompt, on timm 0.6.5's module layout):
- ResNet: before layer k (after the stem for k = 1); ConvNeXt: before stages[k-1] (its downsample included).
- Swin: after layers[k-1]'s patch merging, before its blocks (timm 0.6.5 ends a stage with the merging).
- ViT/DeiT, MLP-Mixer and ResMLP: after the block of stage k-1 (blocks 1, 3, 9 of 12), before block 0 for k = 1.
`register_staged` adds a family; a teacher without a row gets one clear error. `kdcore.stages.hook_shapes` finds
what each hook receives by a dry run.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
from timm.models.convnext import ConvNeXt
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from kdcore.errors import UserError

from . import entry_for, family_for


def _identity(x):
    return x


def _run(modules):
    def body(x):
        for module in modules:
            x = module(x)
        return x
    return body


@dataclass(frozen=True)
class Staged:
    """One family's forward in pieces: `stem(model, x)`; `segments(model)`, the (entry, body) pair of each paper
    stage (stage k = body(hook(entry(h)))); `finish(model, h)`, the rest of forward_features; and the layout of
    the tensor between the pieces ('NCHW', 'NHWC' or 'NLC')."""
    layout: str
    stem: Callable
    segments: Callable
    finish: Callable


def _resnet_stem(m, x):
    return m.maxpool(m.act1(m.bn1(m.conv1(x))))


def _vit_stem(m, x):
    return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


def _block_segments(m):
    """Blocks of stage k: after the previous stage's block up to its own (the stage table's indices)."""
    indices = family_for(m).indices(m)
    starts = (0, *(i + 1 for i in indices[:-1]))
    return [(_identity, _run(m.blocks[start:end + 1])) for start, end in zip(starts, indices)]


def _block_finish(m, x):
    last = family_for(m).indices(m)[-1]
    return m.norm(_run(m.blocks[last + 1:])(x))


STAGED = {
    ResNet: Staged("NCHW", _resnet_stem, lambda m: [(_identity, layer) for layer in
                                                    (m.layer1, m.layer2, m.layer3, m.layer4)], lambda m, x: x),
    ConvNeXt: Staged("NCHW", lambda m, x: m.stem(x), lambda m: [(_identity, stage) for stage in m.stages],
                     lambda m, x: m.norm_pre(x)),
    SwinTransformer: Staged("NHWC", lambda m, x: m.patch_embed(x),
                            lambda m: [(layer.downsample, layer.blocks) for layer in m.layers],
                            lambda m, x: m.norm(x)),
    VisionTransformer: Staged("NLC", _vit_stem, _block_segments, _block_finish),
    MlpMixer: Staged("NLC", lambda m, x: m.stem(x), _block_segments, _block_finish),
}


def register_staged(model_class, staged):
    """Add a family's staged forward (a model file calls this for the class it defines)."""
    STAGED[model_class] = staged
    return staged


def staged_for(model):
    """The staged forward of the model's class or its nearest listed parent class."""
    return entry_for(STAGED, model,
                     f"no staged forward for teacher class {type(model).__name__} (PAT's prompted teacher needs one): "
                     f"register it with custom_forward.staged.register_staged, or choose a ResNet, ConvNeXt, Swin, "
                     f"ViT/DeiT, MLP-Mixer or ResMLP teacher")


def _hooked(h, hook, layout, prefix):
    """`hook` applied to `h` seen as an NCHW map; `h`'s own layout, prefix tokens and strides back (the next block
    may compute in another order on other strides, and a hook returning its input must change nothing)."""
    if layout == "NCHW":
        out = hook(h)
    elif layout == "NHWC":
        out = hook(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    else:
        tokens = h[:, prefix:]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise UserError(f"{tokens.shape[1]} patch tokens do not form a square map")
        grid = tokens.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)
        tokens = hook(grid).flatten(2).transpose(1, 2)
        out = torch.cat((h[:, :prefix], tokens), dim=1) if prefix else tokens
    if out.stride() == h.stride():
        return out
    return h.new_empty_strided(h.shape, h.stride()).copy_(out)


def _stage_layout(h, layout):
    """A stage output in the stage table's layout: NCHW maps for CNNs, (B, L, D) tokens otherwise."""
    return h.flatten(1, 2) if layout == "NHWC" else h


def staged_forward(model, x, hooks=None):
    """(final features, {paper stage 1-4: tensor}) of `model` on `x`, `hooks[k]` (map -> map) applied where stage k
    begins; under the caller's autograd mode and autocast."""
    staged, hooks = staged_for(model), hooks or {}
    prefix = family_for(model).prefix_tokens(model)
    h = staged.stem(model, x)
    stages = {}
    for stage, (entry, body) in enumerate(staged.segments(model), start=1):
        h = entry(h)
        if stage in hooks:
            h = _hooked(h, hooks[stage], staged.layout, prefix)
        h = body(h)
        stages[stage] = _stage_layout(h, staged.layout)
    return staged.finish(model, h), stages

