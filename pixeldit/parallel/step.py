"""The step protocol every strategy offers the trainer:

    strategy.begin_step(lr, clip)
    for each micro-batch:  with strategy.accumulating(last): v, h = strategy.forward(...); strategy.backward(loss)
    grad_norm, stepped = strategy.finish_step(skip)

finish_step clips, and skips the update when told to or when the global gradient norm is not finite
(every rank sees the same norm, so every rank agrees); the step's lr is pushed into the optimizer.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .deepspeed_internals import set_gradient_clipping
from .spec import ParallelSpec


class Step:
    """ddp and fsdp: a torch optimizer over the module's parameters."""

    # DeepSpeed divides the loss by its accumulation count itself; the trainer does it for the others
    averages_micro_batches = False

    def __init__(self, spec: ParallelSpec, device: torch.device, module, wrapped, optimizer, checkpoint):
        self.name, self.spec, self.device = spec.strategy, spec, device
        self.module, self.wrapped, self.optimizer = module, wrapped, optimizer
        self.checkpoint = checkpoint  # checkpoint_state.py: save / load / fragments / full_state_dict
        self.lr, self.clip = spec.optimizer.lr, spec.optimizer.clip

    def forward(self, x_t, t, y):
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.spec.bf16 \
            else contextlib.nullcontext()
        with autocast:
            return self.wrapped(x_t, t, y)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def begin_step(self, lr: float, clip: float):
        self.lr, self.clip = lr, clip

    def finish_step(self, skip: bool) -> tuple[float, bool]:
        norm = self._clip(self.clip)
        if skip or not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm, False
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, True

    def _clip(self, clip: float) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        # torch's clip multiplies every gradient by min(1, clip / (norm + 1e-6)): below the clip by
        # exactly 1.0, a pass over all gradients that changes no bit. Near or above the clip torch does
        # its own arithmetic, so the result is clip_grad_norm_'s bit for bit; a non-finite norm skips
        # the update anyway
        if math.isfinite(value) and value >= clip * (1 - 1e-3):
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        return value


class DDPStep(Step):
    def accumulating(self, last: bool):
        if self.wrapped is not self.module and not last:  # wrapped only with more than one process
            return self.wrapped.no_sync()
        return contextlib.nullcontext()


class FSDPStep(Step):
    def forward(self, x_t, t, y):
        # FSDP2 casts parameters itself; the inputs follow its param dtype
        return self.wrapped(x_t.to(torch.bfloat16) if self.spec.bf16 else x_t, t, y)

    def accumulating(self, last: bool):
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()


class ZeroStep(Step):
    """DeepSpeed's engine steps itself at the accumulation boundary; the staged lr and clip are pushed in."""

    averages_micro_batches = True

    def __init__(self, spec, device, engine, optimizer, checkpoint):
        super().__init__(spec, device, engine.module, engine, optimizer, checkpoint)
        self.engine = engine
        self._skipped = engine.skipped_steps

    def forward(self, x_t, t, y):
        # DeepSpeed holds bf16 weights without autocast: inputs must match them
        return self.engine(x_t.to(torch.bfloat16) if self.spec.bf16 else x_t, t, y)

    def backward(self, loss):
        self.engine.backward(loss)
        self.engine.step()  # a no-op for the optimizer until the accumulation boundary

    def begin_step(self, lr: float, clip: float):
        super().begin_step(lr, clip)
        set_gradient_clipping(self.engine, clip)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self._skipped = self.engine.skipped_steps  # a resume may have loaded another count

    def finish_step(self, skip: bool) -> tuple[float, bool]:
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = self.engine.skipped_steps != self._skipped
        self._skipped = self.engine.skipped_steps
        return norm, not skipped and not skip
