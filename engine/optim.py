"""The optimizer of a run: timm's parameter groups computed on the student, plus the distiller's own modules.

Handing the whole distiller to `create_optimizer_v2` names the student's parameters `student.blocks.0...`,
which the student's `group_matcher()` does not recognise, so `--layer-decay` silently gave every parameter the
same scale. Here the student's groups are computed on the student itself; the distiller's extra modules (AAD,
projectors) get an lr scale of 1.
"""
from timm.optim import create_optimizer_v2, optimizer_kwargs, param_groups_layer_decay, param_groups_weight_decay

from kdcore.errors import UserError

DEFAULT_LR = 0.05  # when neither --lr nor --lr-base is given


class _ExtraParameters:
    """The distiller's trainable parameters outside the student, in the shape timm's group helpers read."""

    def __init__(self, distiller):
        self.distiller = distiller

    def named_parameters(self):
        return ((n, p) for n, p in self.distiller.named_parameters() if not n.startswith("student."))


def _name_groups(groups, prefix):
    """Give each group a readable `name` (kept by torch's optimizers and their state dicts)."""
    for group in groups:
        decay = "decay" if group["weight_decay"] else "no_decay"
        scale = f"_lr_scale_{group['lr_scale']:.4g}" if "lr_scale" in group else ""
        group["name"] = f"{prefix}{scale}_{decay}"
    return groups


def student_param_groups(student, weight_decay, layer_decay=None, layer_decay_min_scale=0.0,
                         layer_decay_no_opt_scale=None):
    """timm's groups for the student alone: layer-wise lr decay by its `group_matcher()` when `layer_decay` is
    set, else weight-decay groups; never decay for norms, biases, 1-D parameters and its `no_weight_decay()`."""
    no_decay = getattr(student, "no_weight_decay", lambda: set())()
    if layer_decay is None:
        return param_groups_weight_decay(student, weight_decay, no_weight_decay_list=no_decay)
    return param_groups_layer_decay(student, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay,
                                    min_scale=layer_decay_min_scale, no_opt_scale=layer_decay_no_opt_scale)


def extra_param_groups(distiller, weight_decay):
    """Groups for everything the distiller trains besides the student (lr scale 1, same no-decay rule)."""
    no_decay = distiller.no_weight_decay() if hasattr(distiller, "no_weight_decay") else set()
    return param_groups_weight_decay(_ExtraParameters(distiller), weight_decay, no_weight_decay_list=no_decay)


def build_optimizer(distiller, args):
    """The run's optimizer from `--opt/--lr/--weight-decay/--momentum/--layer-decay ...`, built by timm.

    A list of groups is passed to `create_optimizer_v2`, which then builds no groups of its own: every group
    carries its own `weight_decay` (the optimizer default never applies), and `lr_scale` is applied by timm's
    schedulers. A setting timm or torch rejects becomes a UserError.
    """
    kwargs = optimizer_kwargs(args)
    weight_decay = kwargs["weight_decay"]
    layer_decay = {k: kwargs.pop(k) for k in ("layer_decay", "layer_decay_min_scale", "layer_decay_no_opt_scale")
                   if k in kwargs}
    try:
        groups = _name_groups(student_param_groups(distiller.student, weight_decay, **layer_decay), "student")
        groups += _name_groups(extra_param_groups(distiller, weight_decay), "extra")
        return create_optimizer_v2(groups, **kwargs)
    except ValueError as exc:  # e.g. timm's 'sgd' is Nesterov, which refuses --momentum 0
        raise UserError(f"optimizer settings rejected ({exc}); check --opt {args.opt} with --momentum/--lr/"
                        f"--weight-decay (for SGD without momentum use --opt momentum --momentum 0)") from None


def resolve_lr(args, world_size):
    """Set `args.lr` when --lr is not given, and return how it was chosen (for the start-up log).

    timm's rule: lr = lr_base * ratio, with ratio = global batch / lr_base_size taken as it is (linear) or as its
    square root (sqrt, the default for Ada*/LAMB optimizers). The global batch counts every process and every
    gradient-accumulation step. The resolved value (and scale) stay in `args`, so args.yaml records them.
    """
    if args.lr is not None:
        return "--lr"
    if args.lr_base is None:
        args.lr = DEFAULT_LR
        return "the default; --lr-base scales one with the global batch"
    if args.lr_base_size < 1:
        raise UserError(f"--lr-base-size must be at least 1 (the global batch --lr-base is meant for), "
                        f"got {args.lr_base_size}")
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = "sqrt" if any(name in args.opt.lower() for name in ("ada", "lamb")) else "linear"
    args.lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == "sqrt" else ratio)
    return (f"--lr-base {args.lr_base:g} for a global batch of {args.lr_base_size}, scaled {args.lr_base_scale} "
            f"to the global batch of {global_batch}")
