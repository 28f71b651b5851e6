"""build_strategy: the one switch, `distributed.strategy` (ddp | fsdp | zero1-3), from the plain
TrainModule to a step (step.py) over the wrapped module (wrap.py) with its checkpoint state
(checkpoint_state.py)."""

from __future__ import annotations

import torch

from ..distributed import world
from ..errors import ConfigError
from .checkpoint_state import DDPCheckpoint, FSDPCheckpoint, ZeroCheckpoint
from .spec import STRATEGIES, ParallelSpec
from .step import DDPStep, FSDPStep, Step, ZeroStep
from .train_module import TrainModule
from .wrap import apply_activation_checkpointing, apply_ddp, apply_deepspeed, apply_fsdp, compile_blocks


def build_strategy(module: TrainModule, spec: ParallelSpec, device: torch.device) -> Step:
    if spec.strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy={spec.strategy!r}: expected one of {STRATEGIES}")
    apply_activation_checkpointing(module.model, spec.activation_checkpointing)
    if spec.compile:
        compile_blocks(module.model)
    rank, size = world()
    if spec.strategy == "ddp":
        wrapped, optimizer = apply_ddp(module, spec, device, size)
        return DDPStep(spec, device, module, wrapped, optimizer, DDPCheckpoint(module, optimizer, device, rank))
    if spec.strategy == "fsdp":
        wrapped, optimizer = apply_fsdp(module, spec, device)
        return FSDPStep(spec, device, module, wrapped, optimizer, FSDPCheckpoint(module, optimizer))
    engine, optimizer = apply_deepspeed(module, spec)
    return ZeroStep(spec, device, engine, optimizer, ZeroCheckpoint(engine, spec.zero_stage, rank, size))
