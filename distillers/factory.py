"""The one place a distiller is built: its `DistillerContext` from the student and the sources, each described by
its model, by its `describe(stages)` (a frozen or cached source of the engine) or by an `OutputInfo` already."""
import torch

from kdcore.errors import UserError
from kdcore.stages import OutputInfo, describe_model, hook_shapes

from .base import DistillerContext
from .registry import DISTILLERS, get_distiller_class


def describe(source, input_size, stages):
    """The `OutputInfo` of a model (a dry run at `input_size`), of a source (`source.describe(stages)`), or itself."""
    if isinstance(source, OutputInfo):
        return source
    if isinstance(source, torch.nn.Module):
        return describe_model(source, input_size, stages)
    return source.describe(stages)


def refuse_unread_flags(cls, args):
    """A UserError when a shared switch is on that `cls` does not read (`--logit-stand`); a weight such as
    --kd-loss-weight has a default and is not refused."""
    if getattr(args, "logit_stand", False) and "logit_stand" not in cls.shared_flags:
        readers = sorted(name for name, klass in DISTILLERS.items() if "logit_stand" in klass.shared_flags)
        raise UserError(f"--logit-stand standardises the logits of a KL-type logit loss, read by {', '.join(readers)}; "
                        f"--distiller {cls.name} does not read it: drop the flag or choose one of those")


def build_distiller(args, student, *, input_size=None, teacher=None, teacher_input_size=None, sources=None,
                    gt_criterion=None, num_classes=None, dataset_size=0, train_labels=None, world_size=1,
                    distiller_cls=None):
    """The `args.distiller` distiller (or `distiller_cls`, an unregistered one) around `student`.

    Args:
        args: the parsed train.py arguments (the distiller reads its own flags and the common loss weights).
        student: the student model; its requested stages are probed at `input_size` ((C, H, W) or an int).
        teacher: the teacher as a model (probed at `teacher_input_size`, default `input_size`), a source, or an
            `OutputInfo`; None for methods without a teacher.
        sources: {SourceSpec.name: model, source or OutputInfo} of the sources `extra_sources(args)` declares.
        gt_criterion: the ground-truth loss (default cross-entropy); num_classes (default --num-classes);
            dataset_size and train_labels (class per dataset index) for memory banks; world_size for the global
            batch.
        input_size may be left out when no stage is requested.

    Example:
        distiller = build_distiller(args, student, input_size=32, teacher=teacher_model, dataset_size=512,
                                    train_labels=labels)
    """
    cls = distiller_cls or get_distiller_class(args.distiller)
    refuse_unread_flags(cls, args)
    student_request, teacher_request = cls.feature_requests(args)
    specs = {spec.name: spec for spec in cls.extra_sources(args)}
    missing = [spec for name, spec in specs.items() if name not in (sources or {})]
    if missing:
        raise UserError(f"--distiller {cls.name} needs its {missing[0].role}: {missing[0].flag('cache')} DIR or "
                        f"{missing[0].flag('source')} MODEL (train.py builds it from those flags)")
    context = DistillerContext(
        args=args, gt_criterion=gt_criterion if gt_criterion is not None else torch.nn.CrossEntropyLoss(),
        num_classes=num_classes or args.num_classes, dataset_size=dataset_size, train_labels=train_labels,
        world_size=world_size,
        seed=args.seed, student=describe(student, input_size, student_request.stages),
        teacher_hook_shapes=hook_shapes(teacher, teacher_input_size or input_size)
        if cls.needs_live_teacher and isinstance(teacher, torch.nn.Module) else None,
        teacher=describe(teacher, teacher_input_size or input_size, teacher_request.stages)
        if teacher_request is not None and teacher is not None else None,
        sources={name: describe(source, input_size, specs[name].request.stages)
                 for name, source in (sources or {}).items()})
    return cls(student, context)
