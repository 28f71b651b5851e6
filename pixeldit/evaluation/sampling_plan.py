"""Which images to sample: one plan for `pixeldit sample`, FID in the training loop and the preview grids.

Image i has the class `labels[i]` and its noise from (seed, i) (diffusion/samplers.py), so an
image is the same whoever samples it. The images still to do are cut, in image order, into
batches of `batch_size`, and batch k goes to rank k mod world: the same batches whatever the
world size, so a set sampled on 8 ranks equals the set sampled on one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..diffusion.samplers import SampleResult, sample


@dataclass(frozen=True)
class SamplerSettings:
    """How every image of a plan is integrated (the sampler, its grid and guidance)."""
    sampler: str = "ab2"
    steps: int = 100
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    time_shift: float = 1.0


@dataclass(frozen=True)
class SamplingPlan:
    labels: torch.Tensor  # int64, image i's class
    seed: int
    image_size: int

    @classmethod
    def interleaved(cls, classes: Sequence[int], count: int, seed: int, image_size: int) -> "SamplingPlan":
        """`count` images, image i of class classes[i % len(classes)].

        Interleaved rather than sorted: every stretch of the images covers all classes, so the ADM
        suite's Inception Score (consecutive splits of 5,000), an FID-n of the first n and any prefix
        of a partial run see the class distribution they should.
        """
        classes = torch.as_tensor(list(classes), dtype=torch.int64)
        return cls(classes.repeat(-(-count // len(classes)))[:count], seed, image_size)

    @classmethod
    def class_rows(cls, classes: Sequence[int], per_class: int, seed: int, image_size: int) -> "SamplingPlan":
        """`per_class` images of each class in turn: a grid with one row per class."""
        labels = torch.as_tensor(list(classes), dtype=torch.int64).repeat_interleave(per_class)
        return cls(labels, seed, image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, rank: int = 0, world: int = 1, done: np.ndarray | None = None) -> list[list[int]]:
        """The image indices `rank` samples, batch by batch: batch k of the images not `done` on rank k mod world."""
        todo = np.arange(len(self), dtype=np.int64)
        if done is not None:
            todo = np.setdiff1d(todo, done)
        return [todo[k:k + batch_size].tolist() for k in range(0, len(todo), batch_size)][rank::world]

    def sample(self, model, indices: list[int], settings: SamplerSettings, null_class: int, device) -> SampleResult:
        """Images `indices` of the plan, as floats in [−1, 1] (model: a velocity function of (x, t, y))."""
        s = settings
        return sample(model, self.labels[torch.as_tensor(indices, dtype=torch.int64)], indices,
                      (3, self.image_size, self.image_size), null_class=null_class, seed=self.seed, sampler=s.sampler,
                      steps=s.steps, cfg_scale=s.cfg_scale, cfg_interval=tuple(s.cfg_interval),
                      time_shift=s.time_shift, device=device)
