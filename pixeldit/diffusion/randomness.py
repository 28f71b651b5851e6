"""Per-sample random streams.

A sample's draws come from its own generator, seeded by a hash of (seed, step,
global sample index) for training or (seed, image index) for sampling. So the
draws of a sample do not depend on which micro-batch, accumulation step or rank
it landed on: accumulation, resume and parity between strategies rely on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def stream_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (torch seeds must fit an int64)."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK))
    return h >> 1


def sample_generators(seed: int, indices: Iterable[int], *prefix: int, device="cpu") -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, *prefix, index)."""
    return [torch.Generator(device=device).manual_seed(stream_seed(seed, *prefix, int(i))) for i in indices]


def per_sample_normal(generators: list[torch.Generator], shape: tuple[int, ...], device="cpu",
                      dtype=torch.float32) -> torch.Tensor:
    """Stack one standard-normal tensor of `shape` from each generator."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


def per_sample_uniform(generators: list[torch.Generator], shape: tuple[int, ...] = (), device="cpu") -> torch.Tensor:
    return torch.stack([torch.rand(shape, generator=g, device=device) for g in generators])
