"""REPA's mode, decided once (`repa.mode`: off | cached | online); everything else asks the object.

off     no projector, no REPA loss
cached  targets stream from `pixeldit repa-cache` feature shards beside the data (repa.features)
online  a frozen DINOv2 beside the engine encodes each micro-batch's clean images
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


class RepaOff:
    name = "off"
    has_loss = False         # a projector is trained with the model and a REPA loss is added
    reads_features = False   # the loader streams feature shards beside the data
    encodes_online = False   # DINOv2 runs in every step (memory and time beside the model)

    def check(self, repa, path: str):
        """The config's repa section, as this mode needs it."""

    def build_projector(self, hidden_size: int, encoder_dim: int):
        return None

    def start(self, repa, image_size: int, patch_size: int, device: torch.device, bf16: bool):
        """Load what the targets need, once, before training."""

    def targets(self, micro: dict, x: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """(B, T, C) fp32 targets of the micro-batch's clean images `x`, None without REPA."""
        return None


class RepaCached(RepaOff):
    name = "cached"
    has_loss = True
    reads_features = True

    def check(self, repa, path: str):
        if not repa.features:
            raise ConfigError(f"{path}.features is required with {path}.mode=cached "
                              f"(write it with `pixeldit repa-cache`)")

    def build_projector(self, hidden_size: int, encoder_dim: int):
        from ..models import build_projector
        return build_projector(hidden_size, encoder_dim)

    def targets(self, micro, x, device):
        from ..data_pipelines.loader import repa_target
        return repa_target(micro, device)


class RepaOnline(RepaCached):
    name = "online"
    reads_features = False
    encodes_online = True

    def __init__(self):
        self.encoder = None

    def check(self, repa, path: str):
        pass

    def start(self, repa, image_size, patch_size, device, bf16):
        """Frozen DINOv2 beside the engine (never wrapped, never in a checkpoint); bf16 on GPUs."""
        from ..models.dinov2 import load_dinov2

        dtype = torch.bfloat16 if device.type == "cuda" and bf16 else torch.float32
        encoder = load_dinov2(repa.encoder, image_size, device, dtype)
        tokens = (image_size // patch_size) ** 2
        if encoder.dim != repa.encoder_dim or encoder.tokens != tokens:
            raise ConfigError(f"repa.encoder={repa.encoder}: gives {encoder.tokens} x {encoder.dim} targets, the "
                              f"model needs {tokens} x repa.encoder_dim={repa.encoder_dim}; set "
                              f"repa.encoder_dim={encoder.dim} or choose another encoder")
        self.encoder = encoder

    def targets(self, micro, x, device):
        return self.encoder(x)


MODES = {mode.name: mode for mode in (RepaOff, RepaCached, RepaOnline)}


def repa_mode(name: str) -> RepaOff:
    """The object for a `repa.mode` value (the config's parser has already refused any other)."""
    return MODES[name]()
