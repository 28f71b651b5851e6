"""Rectified flow with velocity prediction, in the reference's time convention.

t = 0 is pure noise, t = 1 is data: x_t = t·x + (1 − t)·ε, target v = x − ε.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .randomness import per_sample_normal, per_sample_uniform, sample_generators

# a fixed tag keeps the training streams apart from sampling streams that share a seed
TRAIN_STREAM = 1


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = t / (t + (1 − t)·s); s > 1 moves t toward noise (used at higher resolution)."""
    if shift == 1.0:
        return t
    return t / (t + (1 - t) * shift)


@dataclass
class FlowDraws:
    t: torch.Tensor        # (B,) in (0, 1)
    noise: torch.Tensor    # (B, C, H, W)
    drop: torch.Tensor     # (B,) bool: label replaced by the null class


@dataclass
class RectifiedFlow:
    num_classes: int
    t_loc: float = 0.0
    t_scale: float = 1.0
    time_shift: float = 1.0
    label_drop: float = 0.1

    @classmethod
    def from_config(cls, diffusion_cfg, num_classes: int) -> "RectifiedFlow":
        return cls(num_classes=num_classes, t_loc=diffusion_cfg.t_loc, t_scale=diffusion_cfg.t_scale,
                   time_shift=diffusion_cfg.time_shift, label_drop=diffusion_cfg.label_drop)

    def draw(self, seed: int, step: int, sample_indices, image_shape: tuple[int, ...], device="cpu") -> FlowDraws:
        """t, ε and the label-drop coin of each sample, from (seed, step, global sample index).

        The draws are made on `device`'s generator: bit-identical for one device
        type whatever the batch split, not across CPU and CUDA.
        """
        device = torch.device(device)
        gens = sample_generators(seed, sample_indices, TRAIN_STREAM, int(step), device=device)
        n = per_sample_normal(gens, (), device=device)
        coin = per_sample_uniform(gens, (), device=device)
        noise = per_sample_normal(gens, tuple(image_shape), device=device)
        t = shift_time(torch.sigmoid(self.t_loc + self.t_scale * n), self.time_shift)
        return FlowDraws(t=t, noise=noise, drop=coin < self.label_drop)

    @staticmethod
    def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return t * x + (1 - t) * noise

    @staticmethod
    def velocity(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x - noise

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor, draws: FlowDraws):
        """(x_t, t, y with dropped labels, target v) for one batch of clean images in [−1, 1]."""
        noise = draws.noise.to(x.device, x.dtype)
        t = draws.t.to(x.device)
        y = torch.where(draws.drop.to(y.device), torch.full_like(y, self.num_classes), y)
        return self.interpolate(x, noise, t), t, y, self.velocity(x, noise)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA alignment per sample: the mean over tokens of 1 − cos(projected, target), shape (B,)."""
    if projected.shape != target.shape:
        raise ValueError(f"REPA: projected tokens {tuple(projected.shape)} vs targets {tuple(target.shape)}")
    return (1 - F.cosine_similarity(projected.float(), target.float(), dim=-1)).mean(1)


def velocity_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared velocity error; `none` gives one value per sample (for exact accumulation)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none'")
