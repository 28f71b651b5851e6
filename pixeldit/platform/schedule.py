"""Staged scalar schedules (lr, grad-clip): explicit stages keyed by step or epoch, optional warm-up.

A stage holds from its `start` until the next stage's start. The value in force
is a pure function of (step, epoch), so a resumed run lands in the right stage
without any schedule state of its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageValues:
    index: int
    lr: float
    clip: float


class StagedSchedule:
    def __init__(self, stages, unit: str = "step", warmup_steps: int = 0):
        if unit not in ("step", "epoch"):
            raise ValueError(f"schedule.unit={unit!r}: expected 'step' or 'epoch'")
        self.stages, self.unit, self.warmup_steps = list(stages), unit, warmup_steps

    @classmethod
    def from_config(cls, cfg) -> "StagedSchedule":
        return cls(cfg.stages, cfg.unit, cfg.warmup_steps)

    def at(self, step: int, epoch: int) -> StageValues:
        """Values for the optimizer step `step` (0-based) taken during `epoch`."""
        position = step if self.unit == "step" else epoch
        index = max(i for i, s in enumerate(self.stages) if s.start <= position)
        stage = self.stages[index]
        lr = stage.lr
        if step < self.warmup_steps:  # linear warm-up of the first stage's lr, counted in steps
            lr = lr * (step + 1) / self.warmup_steps
        return StageValues(index, lr, stage.clip)
