"""torch.distributed set-up for torchrun / torch.distributed.launch, and global-batch helpers."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device_arg, local_rank_arg=None):
    """Join the process group when launched by torchrun or torch.distributed.launch.

    The launchers set WORLD_SIZE/RANK/LOCAL_RANK in the environment; the legacy launcher may also pass
    `--local_rank`/`--local-rank`. nccl on CUDA, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    device = torch.device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistEnv(device=device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def world_size():
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x):
    """Concatenate `x` from every process along dim 0; gradients flow back to each process's part.

    Every process computes the same global-batch loss, so the backward sums the identical per-process
    gradients (reduce-scatter) and DDP's averaging then yields exactly the single-process gradient.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def gather_no_grad(x):
    """Concatenate a tensor that needs no gradient (e.g. teacher features) from every process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor):
    """Sum a tensor over processes (in place when distributed) and return it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown_distributed():
    """Leave the process group once every process is done (a process exiting while the group is alive
    can abort in gloo's threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
