"""torch.distributed set-up for torchrun / torch.distributed.launch, and global-batch helpers."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


@dataclass
class DistEnv:
    """Where this process stands: its global rank, the number of processes, its local rank on the node and the
    device it computes on (a single process: rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: Any = None  # a gloo group for host-side agreement (stop requests, write outcomes); None: the default

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that logs and writes the run's files."""
        return self.rank == 0


def init_distributed(device_arg: str | torch.device, local_rank_arg: int | None = None,
                     timeout_s: float | None = None) -> DistEnv:
    """Join the process group when launched by torchrun, torch.distributed.launch or directly (one process per
    rank with MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK set, as an srun line can).

    The launchers set WORLD_SIZE/RANK/LOCAL_RANK in the environment; the legacy launcher may also pass
    `--local_rank`/`--local-rank`. nccl on CUDA (with a gloo group beside it for host-side agreement), gloo on CPU.

    Args:
        device_arg: the --device value ('cpu', 'cuda', ...); on CUDA each process takes the GPU of its local rank.
        local_rank_arg: the legacy launcher's --local_rank, used when LOCAL_RANK is not in the environment.
        timeout_s: how long a collective waits for the other processes before it fails (--dist-timeout); None:
            torch's default.

    Returns:
        This process's `DistEnv` (rank 0 of 1, with no process group, when WORLD_SIZE is unset or 1).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    device = torch.device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistEnv(device=device)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = restart_store(timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=int(os.environ["RANK"]),
                                world_size=world_size)
    control = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                   control=control)


def restart_store(timeout: datetime.timedelta | None) -> Any:
    """Under torchrun, its store with a prefix of this restart (TORCHELASTIC_RESTART_COUNT); None otherwise.

    torchrun keeps one store across the restarts of `--max-restarts`, so without the prefix a restarted worker
    can read the address a worker of the failed attempt published there and fail to connect to it (seen with
    gloo: "connectFullMesh failed ... Connection refused")."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timeout or datetime.timedelta(minutes=30))
    return dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def any_process(flag: bool, env: DistEnv) -> bool:
    """Whether `flag` is true on any process (a collective on the host: it never waits on a GPU stream)."""
    if not env.distributed:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=env.control)
    return bool(value.item())


def from_main_process(value: Any, env: DistEnv) -> Any:
    """Rank 0's `value` on every process (a collective: every rank must call it; the others' values are ignored)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=env.control)
    return box[0]


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process along dim 0; gradients flow back to each process's part.

    Every process computes the same global-batch loss, so the backward sums the identical per-process
    gradients (reduce-scatter) and DDP's averaging then yields exactly the single-process gradient.

    Args:
        x: this process's part of the batch (B_local x ...); every process must pass the same shape.

    Returns:
        The global batch (world_size * B_local x ...), in rank order; `x` itself in a single process.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This process's rows of a tensor gathered by `gather_with_grad`/`gather_no_grad` (equal parts in rank order);
    `x` itself in a single process."""
    if world_size() == 1:
        return x
    part = x.shape[0] // world_size()
    return x[dist.get_rank() * part:(dist.get_rank() + 1) * part]


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor that needs no gradient (e.g. teacher features) from every process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (in place when distributed) and return it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown_distributed() -> None:
    """Leave the process group once every process is done (a process exiting while the group is alive
    can abort in gloo's threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
