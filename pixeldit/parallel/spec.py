"""What the parallel floor needs to know of a run, built from the config at the top (config.py)."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")


@dataclass(frozen=True)
class OptimizerSpec:
    lr: float                 # the first stage's; the trainer pushes each step's own
    clip: float               # likewise
    betas: tuple[float, float]
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class ParallelSpec:
    strategy: str             # one of STRATEGIES
    bf16: bool                # distributed.precision == "bf16"
    global_batch: int
    micro_batch: int          # per rank
    accumulation: int         # micro-batches per rank per step
    activation_checkpointing: str = "none"   # none | selective | every
    compile: bool = False
    optimizer: OptimizerSpec = OptimizerSpec(1e-4, 1.0, (0.9, 0.999), 1e-8, 0.0)

    @property
    def zero_stage(self) -> int | None:
        return int(self.strategy[-1]) if self.strategy.startswith("zero") else None
