from engine.errors import UserError

DISTILLERS = {}


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


def build_distiller(name, student, context):
    """The distiller `name` around `student`, built with a `DistillerContext`."""
    return get_distiller_class(name)(student, context)
