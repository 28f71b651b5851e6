"""The one module every strategy wraps: the model and, with REPA, the projector trained beside it."""

from __future__ import annotations

import torch.nn as nn


class TrainModule(nn.Module):
    def __init__(self, model: nn.Module, projector: nn.Module | None = None, repa_block: int | None = None):
        super().__init__()
        self.model = model
        self.projector = projector
        self.repa_block = repa_block

    def forward(self, x_t, t, y):
        if self.projector is None:
            return self.model(x_t, t, y), None
        v, hidden = self.model.forward_with_hidden(x_t, t, y, self.repa_block)
        return v, self.projector(hidden)

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, the unit of FSDP sharding, activation checkpointing and compilation."""
        return [*self.model.patch_blocks, *self.model.pixel_blocks]
