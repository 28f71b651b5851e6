"""Every use of a torch module or function marked private (a leading underscore), each with why.

Checked against torch 2.14; an upgrade that moves one of these fails here, in one file.
"""

from __future__ import annotations

import torch


def dtensor_global_offset(param) -> tuple[int, ...]:
    """Where a DTensor's local shard starts in the full tensor (FSDP2 pads uneven shards: the last
    ranks may hold fewer rows or none). DTensor has no public accessor for the offset."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offset)


def fsspec_dcp_writer(url: str, options: dict):
    """DCP's writer for fsspec URLs (object storage) lives in a private module; the public
    FileSystemWriter writes local paths only."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    return FsspecWriter(url, **options)


def fsspec_dcp_reader(url: str, options: dict):
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    return FsspecReader(url, **options)


def sharded_tensor(shards: list, size: list[int]):
    """A 1-D ShardedTensor from this rank's shards (the EMA on disk): DCP's only format for shards at
    offsets the writer chooses; the public package is torch.distributed._shard itself."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    return ShardedTensor._init_from_local_shards(shards, size)


def shard(tensor: torch.Tensor, offset: int, placement: str):
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata
    return Shard(tensor, ShardMetadata([offset], [tensor.numel()], placement))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (avx512_bf16 or AMX); torch answers only
    through these private helpers."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def foreach_lerp_(targets: list[torch.Tensor], ends: list[torch.Tensor], weight: float):
    """targets += weight·(ends − targets), all tensors in one call: the EMA update. torch has no public
    multi-tensor lerp; a Python loop of torch.lerp_ costs one dispatch per parameter."""
    torch._foreach_lerp_(targets, ends, weight)
