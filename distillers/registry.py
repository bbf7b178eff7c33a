from engine.errors import UserError

DISTILLERS = {}


def register_distiller(name):
    def decorator(cls):
        cls.name = name
        DISTILLERS[name] = cls
        return cls
    return decorator


def build_distiller(name, student, teacher_model, args, gt_criterion):
    if name not in DISTILLERS:
        raise UserError(f"unknown --distiller {name!r}; choose one of {', '.join(sorted(DISTILLERS))}")
    return DISTILLERS[name](student, teacher_model, args, gt_criterion)
