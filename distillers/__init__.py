"""Distillers by name. Each module registers its class with `@register_distiller('name')`; `build_distiller`
(distillers/factory.py) is the one way to build one."""
from . import (  # noqa: F401  (importing
               correlation,
               crd,  # registers them)
               dist,
               dkd,
               fitnet,
               kd,
               ofa,
               pat,
               richkd,
               rkd,
               rsd,
               vanilla,
)
from .base import Distiller, fp32_loss  # noqa: F401
from .factory import build_distiller, refuse_unread_flags  # noqa: F401
from .registry import DISTILLERS, add_distiller_arguments, get_distiller_class, register_distiller  # noqa: F401
