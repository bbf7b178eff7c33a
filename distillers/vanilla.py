"""Plain training: the ground-truth loss only, no teacher."""
from .base import Distiller
from .registry import register_distiller


@register_distiller("vanilla")
class Vanilla(Distiller):
    pass
