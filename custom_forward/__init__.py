"""The stage table: how each architecture family hands out the paper's stages 1-4.

`FAMILIES` maps a model class (looked up along the model's MRO, so subclasses such as distilled DeiT match)
to a `Family`: its kind ('cnn': stages are NCHW maps; 'token': stages are NLC sequences with the prefix
tokens, if any, in front), the `forward_intermediates` index of each paper stage, and a `run` function
that turns timm's single pass into that layout. Shapes are never written here: `kdcore.stages.probe_stages`
finds them by a dry run.

Facts, checked against the paper's code:
- ResNet: indices 1-4 (index 0 is the stem). ConvNeXt: 0-3. The CIFAR ResNets of RichKD/CRD (3 stages):
  the stem output and the 3 stage outputs, indices 0-3, as mdistiller orders their features.
- MobileNetV2 (timm's EfficientNet class): stages 1-3 are the stage outputs at strides 4/8/16 (24/32/96
  channels at width 1.0), indices 1-3; stage 4 is the 1280-channel map after the final 1x1 conv, i.e. the
  final features, not the 320-channel block output.
- Swin: 0-3, the last block of each stage; a token model although timm returns NCHW maps, so they are
  flattened to NLC with no prefix token.
- ViT/DeiT, MLP-Mixer and ResMLP: blocks 1, 3, 9, 11 of 12 (0-based), all tokens (class and distillation
  tokens in front, 197 x D for a 224 px ViT); for depth d, round((i + 1) * d / 12) - 1 clamped to [0, d - 1].

A class missing here still works when no stage is requested (logits and embeddings need only timm's
forward_features/forward_head). A model defined in this repo registers its own row from its own file
(`register_family(CifarResNet, Family(...))` in custom_model/cifar_resnet.py); timm's classes are listed here. A
class without forward_intermediates brings its own `run`.
"""
from dataclasses import dataclass
from typing import Callable

import torch
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from kdcore.errors import UserError

FINAL = "final"  # stage index meaning "the model's final features" (MobileNetV2 stage 4)
LAYOUTS = {"cnn": "NCHW", "token": "NLC"}


def scaled_block_indices(depth):
    """Blocks 1, 3, 9, 11 of a 12-block model, scaled to `depth` blocks (Python's round)."""
    return tuple(min(max(round((i + 1) * depth / 12) - 1, 0), depth - 1) for i in (1, 3, 9, 11))


def nchw_maps(model, x, indices):
    return model.forward_intermediates(x, indices=indices, norm=False)


def maps_as_tokens(model, x, indices):
    final, maps = nchw_maps(model, x, indices)
    return final, [m.flatten(2).transpose(1, 2) for m in maps]


def nlc_tokens(model, x, indices):
    return model.forward_intermediates(x, indices=indices, norm=False, output_fmt="NLC")


def nlc_tokens_with_prefix(model, x, indices):
    final, outs = model.forward_intermediates(x, indices=indices, norm=False, output_fmt="NLC",
                                              return_prefix_tokens=True)
    # timm returns (tokens, prefix) pairs, or bare tokens when the model has no prefix token.
    return final, [torch.cat((o[1], o[0]), dim=1) if isinstance(o, tuple) else o for o in outs]


@dataclass(frozen=True)
class Family:
    """One architecture family's row of the stage table."""
    kind: str                                   # 'cnn' or 'token'
    indices: Callable                           # model -> index of paper stages 1-4 (an int or FINAL)
    run: Callable                               # (model, x, sorted indices) -> (final, [stage tensors])
    prefix_tokens: Callable = lambda model: 0   # model -> tokens in front of the patch tokens

    @property
    def layout(self):
        return LAYOUTS[self.kind]


FAMILIES = {
    ResNet: Family("cnn", lambda m: (1, 2, 3, 4), nchw_maps),
    ConvNeXt: Family("cnn", lambda m: (0, 1, 2, 3), nchw_maps),
    EfficientNet: Family("cnn", lambda m: (1, 2, 3, FINAL), nchw_maps),
    SwinTransformer: Family("token", lambda m: (0, 1, 2, 3), maps_as_tokens),
    VisionTransformer: Family("token", lambda m: scaled_block_indices(len(m.blocks)), nlc_tokens_with_prefix,
                              prefix_tokens=lambda m: m.num_prefix_tokens),
    MlpMixer: Family("token", lambda m: scaled_block_indices(len(m.blocks)), nlc_tokens),
}


def register_family(model_class, family):
    """Add a row to the stage table: a model file calls this for the class it defines (custom_model/ does)."""
    FAMILIES[model_class] = family
    return family


def entry_for(table, model, missing):
    """`table`'s entry for the model's class or its nearest listed parent class; a UserError `missing` otherwise."""
    entry = next((table[cls] for cls in type(model).__mro__ if cls in table), None)
    if entry is None:
        raise UserError(missing)
    return entry


def family_for(model):
    """The table entry for the model's class or its nearest listed parent class."""
    return entry_for(FAMILIES, model,
                     f"no stage features for model class {type(model).__name__}: register its row of the stage "
                     f"table with custom_forward.register_family (kind, forward_intermediates index of paper "
                     f"stages 1-4, run function), or use a distiller that needs only logits/embeddings")


def stage_features(model, x, stages):
    """One pass of `model` on `x`: (final features, {paper stage: tensor in the family's layout})."""
    family = family_for(model)
    indices = family.indices(model)
    index_of = {s: indices[s - 1] for s in stages}
    wanted = sorted({i for i in index_of.values() if i != FINAL})  # two stages may share a block
    final, outs = family.run(model, x, wanted) if wanted else (model.forward_features(x), [])
    by_index = dict(zip(wanted, outs))
    by_index[FINAL] = final
    return final, {s: by_index[i] for s, i in index_of.items()}
