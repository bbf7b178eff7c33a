"""Plain training: the ground-truth loss only, no teacher (the "scratch" baseline of the RSD paper's tables)."""
from .base import Distiller
from .registry import register_distiller


@register_distiller("vanilla")
class Vanilla(Distiller):
    """Vanilla, no distillation: the cross-entropy baseline ("scratch" in the RSD paper, Zhang et al., ICCV 2025).

    The "scratch" column of that paper's Table 1 and the "S." column of its Table 2; reads only `--gt-loss-weight`.
    """
