"""Distillers by name. Each module registers its class with `@register_distiller('name')`."""
from .registry import DISTILLERS, build_distiller, register_distiller  # noqa: F401
from . import vanilla, kd, rsd  # noqa: F401,E402  (import registers them)
