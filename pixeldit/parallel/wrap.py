"""Parallelism applied to the plain TrainModule from outside: activation checkpointing and per-block
compilation, then DDP, FSDP2 (fully_shard per block) or DeepSpeed's engine. No parameter is renamed,
so checkpoint keys and EMA names are those of the plain module under every strategy."""

from __future__ import annotations

import torch
import torch.nn as nn

from .optimizer import build_optimizer, deepspeed_config
from .spec import ParallelSpec
from .train_module import TrainModule


def apply_activation_checkpointing(model: nn.Module, mode: str):
    """Recompute block activations in backward (`every` block, or every other with `selective`).

    The block's forward is replaced in place (no wrapper module), so checkpoint keys, EMA names and
    FSDP2's per-block sharding stay exactly as without it.
    """
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint

    for i, block in enumerate([*model.patch_blocks, *model.pixel_blocks]):
        if mode == "selective" and i % 2:
            continue
        inner = block.forward
        block.forward = lambda *args, _inner=inner: checkpoint(_inner, *args, use_reentrant=False)


def compile_blocks(model: nn.Module):
    for block in [*model.patch_blocks, *model.pixel_blocks]:
        block.compile()


def apply_ddp(module: TrainModule, spec: ParallelSpec, device: torch.device, world: int):
    """(the module the step calls, the optimizer); one process needs no wrapper."""
    module.to(device)
    wrapped = module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                          broadcast_buffers=False)
    return wrapped, build_optimizer(module.parameters(), spec)


def apply_fsdp(module: TrainModule, spec: ParallelSpec, device: torch.device):
    """FSDP2: fully_shard per block and at the root; bf16 compute, fp32 reduce, fp32 sharded masters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if spec.bf16 \
        else MixedPrecisionPolicy()
    module.to(device)
    for block in module.blocks():
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module, build_optimizer(module.parameters(), spec)


def apply_deepspeed(module: TrainModule, spec: ParallelSpec):
    """DeepSpeed's engine for ZeRO 1/2/3 with our optimizer settings; (engine, its optimizer)."""
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                                   config=deepspeed_config(spec))
    return engine, optimizer
