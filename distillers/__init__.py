"""Distillers by name. Each module registers its class with `@register_distiller('name')`; `build_distiller`
(distillers/factory.py) is the one way to build one."""
from .base import Distiller, fp32_loss  # noqa: F401
from .factory import build_distiller  # noqa: F401
from .registry import DISTILLERS, add_distiller_arguments, get_distiller_class, register_distiller  # noqa: F401
from . import (vanilla, kd, dkd, dist, rsd, ofa, fitnet, correlation, rkd,  # noqa: F401,E402  (importing
               crd, richkd)  # registers them)
