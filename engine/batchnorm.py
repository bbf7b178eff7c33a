"""BatchNorm under DDP: SyncBatchNorm conversion that keeps timm's fused norm+act layers, and averaging the
running statistics over processes before evaluation and saving."""
import timm.layers
import timm.utils


def convert_sync_batchnorm(model):
    """`model` with every BatchNorm replaced by its synchronised version, sharing its parameters and running
    stats. Children are replaced in place; use the returned module (a new one if `model` itself is a norm).

    timm's converter, not torch's: torch turns timm's `BatchNormAct2d` (MobileNetV2, EfficientNet ...) into a
    plain `SyncBatchNorm` and silently drops the activation (and drop) fused into it.
    """
    return timm.layers.convert_sync_batchnorm(model)


def sync_batchnorm_stats(modules, world_size, average=True):
    """Make the BatchNorm running mean/var of each module identical on all processes, in place: their
    average, or rank 0's with `average=False` (timm's `distribute_bn`). Every rank must call it with the
    same modules in the same order; a no-op for a single process. Call before evaluating and before saving
    (the student and each EMA)."""
    if world_size <= 1:
        return
    for module in modules:
        timm.utils.distribute_bn(module, world_size, reduce=average)
