"""Feature adapters: how to get (final features, stage features) out of a model in one pass.

timm models with `forward_intermediates()` need nothing here. A model class without it registers an
adapter with `@register_feature_adapter(ModelClass)`; the adapter has the signature
`adapter(model, x, indices) -> (final_features, [stage features])`, where `final_features` is what
`model.forward_head` expects.
"""
from engine.errors import UserError

_ADAPTERS = {}


def register_feature_adapter(model_cls):
    def decorator(fn):
        _ADAPTERS[model_cls] = fn
        return fn
    return decorator


def timm_forward_intermediates(model, x, indices):
    if not indices:
        return model.forward_features(x), []
    return model.forward_intermediates(x, indices=list(indices), norm=False)


def feature_adapter_for(model):
    """The adapter registered for the model's class (or a parent class), else timm's own API."""
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    if hasattr(model, "forward_intermediates") and hasattr(model, "forward_head"):
        return timm_forward_intermediates
    raise UserError(f"{type(model).__name__} has no forward_intermediates(); register an adapter for it "
                    f"in custom_forward/ (see custom_forward/__init__.py)")
