"""The registered distillers by name, and the parser flags they bring."""
from kdcore.errors import UserError

DISTILLERS = {}
# Flags several methods read (a distiller lists those it reads in `shared_flags`); each one's help names its readers.
GT_LOSS_HELP = "weight of the ground-truth loss"
KD_LOSS_HELP = "weight of the distillation loss"
LOGIT_STAND_HELP = ("z-score each sample's logits, student and teacher, before the temperature (logit "
                    "standardisation, Sun et al., CVPR 2024)")


def register_distiller(name):
    def decorator(cls):
        cls.name = name
        DISTILLERS[name] = cls
        return cls
    return decorator


def get_distiller_class(name):
    if name not in DISTILLERS:
        raise UserError(f"unknown --distiller {name!r}; choose one of {', '.join(sorted(DISTILLERS))}")
    return DISTILLERS[name]


def _defining_classes(registry):
    """Every class along the registered classes' MROs that defines `add_arguments` itself, each once, parents first."""
    classes = []
    for cls in registry.values():
        for klass in reversed(cls.__mro__):
            if "add_arguments" in vars(klass) and klass not in classes:
                classes.append(klass)
    return classes


def _names(classes):
    return ", ".join(sorted({cls.name for cls in classes}))


def add_distiller_arguments(parser, registry=None):
    """--distiller, the common flags (their help names the methods that read them), then each method's own
    flags (a flag another method borrows says so in its help)."""
    registry = DISTILLERS if registry is None else registry
    g = parser.add_argument_group("distillation")
    g.add_argument("--distiller", default="vanilla", choices=sorted(registry))
    g.add_argument("--gt-loss-weight", type=float, default=1.0, help=f"{GT_LOSS_HELP} (every distiller)")
    kd_readers = [cls for cls in registry.values() if "kd_loss_weight" in cls.shared_flags]
    g.add_argument("--kd-loss-weight", type=float, default=1.0,
                   help=f"{KD_LOSS_HELP}, read by {_names(kd_readers)} (the others have weights of their own)")
    stand_readers = [cls for cls in registry.values() if "logit_stand" in cls.shared_flags]
    g.add_argument("--logit-stand", action="store_true",
                   help=f"{LOGIT_STAND_HELP}; read by {_names(stand_readers)}, refused by the others")
    for klass in _defining_classes(registry):
        klass.add_arguments(parser)
    borrowers = {}
    for cls in registry.values():
        for dest, owner in cls.borrowed_flags.items():
            borrowers.setdefault(dest, set()).add(cls)
    for action in parser._actions:
        if action.dest in borrowers:
            action.help = f"{action.help or ''} (also read by {_names(borrowers[action.dest])})".lstrip()
