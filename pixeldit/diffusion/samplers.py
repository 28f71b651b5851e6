"""ODE / SDE samplers for the velocity field, integrating t from 0 (noise) to 1 (data).

The timestep grid is the reference's: linspace(0, 1 − 1/N, N) with 1.0 appended,
then the time shift; it is built in float64 so that whether a step falls inside
the CFG interval does not depend on rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .flow import shift_time
from .randomness import per_sample_normal, sample_generators

SAMPLERS = ("ab2", "euler", "heun", "sde")
SAMPLE_NOISE_STREAM = 2
SDE_NOISE_STREAM = 3


def timestep_grid(steps: int, time_shift: float = 1.0) -> torch.Tensor:
    """N + 1 float64 times from 0 to 1 (N steps)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    # i / N rounds each point once, so t = 0.1 is exactly the float 0.1 a user writes
    # as a CFG bound (linspace can land one ulp off and flip the strict comparison)
    grid = torch.cat([torch.arange(steps, dtype=torch.float64) / steps, torch.ones(1, dtype=torch.float64)])
    return shift_time(grid, time_shift)


@dataclass
class GuidedVelocity:
    """v(x, t) for a batch of labels, with classifier-free guidance inside (t_min, t_max).

    Inside the open interval one batched pass of [uncond; cond] gives
    v_u + w·(v_c − v_u); outside it the conditional pass runs alone, so those
    steps cost half. `image_evaluations` counts images pushed through the model.
    """

    model: Callable
    labels: torch.Tensor
    null_class: int
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    image_evaluations: int = field(default=0, init=False)

    def guided_at(self, t: float) -> bool:
        lo, hi = self.cfg_interval
        return self.cfg_scale != 1.0 and lo < t < hi

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        B = x.shape[0]
        if not self.guided_at(t):
            self.image_evaluations += B
            return self.model(x, torch.full((B,), t, device=x.device, dtype=torch.float32), self.labels)
        null = torch.full_like(self.labels, self.null_class)
        tt = torch.full((2 * B,), t, device=x.device, dtype=torch.float32)
        v = self.model(torch.cat([x, x]), tt, torch.cat([null, self.labels]))
        self.image_evaluations += 2 * B
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)


def initial_noise(seed: int, image_indices, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """x at t = 0 for each image, from (seed, image index): the same image whatever the batch."""
    gens = sample_generators(seed, image_indices, SAMPLE_NOISE_STREAM)
    return per_sample_normal(gens, shape).to(device)


@torch.no_grad()
def integrate(velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, *, sampler: str = "ab2",
              steps: int = 100, time_shift: float = 1.0, seed: int = 0, image_indices=None,
              progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from t = 0 to 1 with the named sampler.

    `seed` and `image_indices` only matter for the SDE sampler: its per-step
    noise comes from one stream per image.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    ts = timestep_grid(steps, time_shift).tolist()
    sde_gens = None
    if sampler == "sde":
        indices = range(x.shape[0]) if image_indices is None else image_indices
        sde_gens = sample_generators(seed, indices, SDE_NOISE_STREAM)
    v_prev = None
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity(x, t)
        if sampler == "euler":
            x = x + dt * v
        elif sampler == "ab2":
            # the authors keep the fixed 1.5 / −0.5 weights even on uneven (shifted) steps
            x = x + dt * (v if v_prev is None else 1.5 * v - 0.5 * v_prev)
            v_prev = v
        elif sampler == "heun" and i < steps - 1:
            x_euler = x + dt * v
            x = x + dt * 0.5 * (v + velocity(x_euler, t_next))
        elif sampler == "heun":
            # no corrector at t = 1: v(x, 1) = E[x − ε | x] is ill-posed there (ε cannot be
            # read off clean data), so the last step is Euler, as EDM does at σ = 0
            x = x + dt * v
        else:
            x = _sde_step(x, v, t, dt, last=i == steps - 1, generators=sde_gens)
        if progress is not None:
            progress(i + 1)
    return x


def _sde_step(x, v, t, dt, *, last, generators):
    """Euler–Maruyama with diffusion w(t) = 1 − t; the score follows from v and x_t.

    From x_t = t·x + (1 − t)·ε and v = x − ε: ε̂ = x_t − t·v and the score is
    −ε̂ / (1 − t). The final step is the deterministic Euler step.
    """
    if last:
        return x + dt * v
    w = 1.0 - t
    score = -(x - t * v) / (1.0 - t)
    noise = per_sample_normal(generators, tuple(x.shape[1:])).to(x.device, x.dtype)
    return x + (v + score * w) * dt + (2.0 * w * dt) ** 0.5 * noise


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] images → uint8 with clip((x + 1)·127.5 + 0.5), the ADM suite's conversion."""
    return ((x.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


@dataclass
class SampleResult:
    images: torch.Tensor
    image_evaluations: int


def sample(model: Callable, labels: torch.Tensor, image_indices, image_shape: tuple[int, ...], *,
           null_class: int, seed: int = 0, sampler: str = "ab2", steps: int = 100, cfg_scale: float = 1.0,
           cfg_interval: tuple[float, float] = (0.0, 1.0), time_shift: float = 1.0,
           device="cpu", progress=None) -> SampleResult:
    """Generate one batch: noise from (seed, image index), then integrate with optional CFG."""
    labels = labels.to(device)
    velocity = GuidedVelocity(model, labels, null_class, cfg_scale, tuple(cfg_interval))
    x = initial_noise(seed, image_indices, image_shape, device)
    x = integrate(velocity, x, sampler=sampler, steps=steps, time_shift=time_shift, seed=seed,
                  image_indices=image_indices, progress=progress)
    return SampleResult(images=x, image_evaluations=velocity.image_evaluations)
