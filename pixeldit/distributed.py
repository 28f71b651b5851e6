"""The distributed environment: joining the process group torchrun / the deepspeed launcher / SLURM
describe in the environment, and this process's place in it.

The bottom floor of the package: every verb that runs on many processes (`train`, `sample`,
`repa-cache`) joins through `join_process_group`, and code below the trainer asks `world()`.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def join_process_group(cuda: bool, backend: str = "auto", timeout_s: float = 1800.0) -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether this call started the group).

    With WORLD_SIZE > 1 the group starts here (nccl on GPUs, gloo otherwise, unless `backend`
    says which); a group someone already started is used as it is.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if cuda else "gloo")
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
        started = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, started
    return int(os.environ.get("RANK", "0")), 1, local_rank, started


def world() -> tuple[int, int]:
    """(rank, world size) of the started process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
