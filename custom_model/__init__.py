"""Architectures the paper uses that timm lacks, registered with timm on import.

After `import custom_model`, `timm.create_model(name)` and every `--model`/`--teacher` flag accept them.
"""
from . import cifar_resnet, demo_models, swin_small_variants  # noqa: F401
