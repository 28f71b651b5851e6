"""The REPA projector: maps a patch-block hidden state to the encoder's feature width."""

from __future__ import annotations

import torch.nn as nn


def build_projector(hidden_size: int, encoder_dim: int = 768, projector_dim: int | None = None) -> nn.Sequential:
    """Linear(D→D), SiLU, Linear(D→D), SiLU, Linear(D→C_enc); trained with the model, not part of it."""
    width = projector_dim or hidden_size
    return nn.Sequential(
        nn.Linear(hidden_size, width), nn.SiLU(),
        nn.Linear(width, width), nn.SiLU(),
        nn.Linear(width, encoder_dim),
    )
