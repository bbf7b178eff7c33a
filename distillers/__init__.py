"""Distillers by name. Each module registers its class with `@register_distiller('name')`."""
from .base import Distiller, DistillerContext  # noqa: F401
from .registry import DISTILLERS, build_distiller, get_distiller_class, register_distiller  # noqa: F401
from . import (vanilla, kd, dkd, dist, rsd, ofa, fitnet, correlation, rkd,  # noqa: F401,E402  (importing
               crd, richkd)  # registers them)
