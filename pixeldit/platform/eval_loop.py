"""FID in the training loop: every `eval.every_steps`, the EMA weights sample `eval.num_images`.

The images are a SamplingPlan (label i mod num_classes, noise from (eval.seed, i)) cut into
batches of `eval.batch_size`, batch k on rank k mod world, so the set is the same whatever the
world size. Each rank feeds its uint8 samples through the FID Inception and keeps float64 sums;
one all-reduce of (count, sum, sum of outer products) gives the statistics, and rank 0 logs
FID-n against the reference batch's `mu`/`sigma`, plus a grid of the first samples (without
Inception weights only the grid's 64 images are sampled). FID-n with n in the thousands is
biased upwards against FID-50k: compare runs at the same n, not with the paper's numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..diffusion import to_uint8
from ..evaluation.evaluate import InceptionStats, iter_image_batches, read_reference
from ..evaluation.inception import load_inception
from ..evaluation.sampling_plan import SamplerSettings, SamplingPlan
from ..models import PixelDiT, PixelDiTArch
from .preview import gather_ema_model

log = logging.getLogger("pixeldit.eval")
GRID_IMAGES = 64


@dataclass(frozen=True)
class EvalSpec:
    """What the in-loop evaluation needs of the run."""
    image_size: int
    num_images: int
    batch_size: int
    seed: int
    sampler: SamplerSettings
    inception: str | None   # FID Inception weights; None: only the grid
    reference: str | None   # the ADM reference batch .npz


def eval_spec(cfg) -> EvalSpec:
    """`cfg` (a Config) as the in-loop evaluation needs it."""
    e = cfg.eval
    sampler = SamplerSettings(sampler=e.sampler, steps=e.steps, cfg_scale=e.cfg_scale,
                              cfg_interval=tuple(e.cfg_interval), time_shift=cfg.diffusion.time_shift)
    return EvalSpec(image_size=cfg.data.image_size, num_images=e.num_images, batch_size=e.batch_size, seed=e.seed,
                    sampler=sampler, inception=e.inception, reference=e.reference)


class InLoopEvaluator:
    def __init__(self, spec: EvalSpec, arch: PixelDiTArch, device: torch.device, rank: int = 0, world: int = 1):
        self.spec, self.arch, self.device, self.rank, self.world = spec, arch, device, rank, world
        self.inception, self.reference = None, None
        if spec.inception:
            self.inception = load_inception(spec.inception, device)
            if rank == 0:  # before training: a missing or malformed reference fails now, not at step M
                self._reference_stats()

    def _reference_stats(self):
        """(mu, sigma) of the reference: precomputed in the file, else computed once from its images."""
        if self.reference is None:
            ref = read_reference(self.spec.reference)
            if "mu" not in ref:
                stats = InceptionStats(self.inception)
                for batch in iter_image_batches(self.spec.reference, self.spec.batch_size):
                    stats.update(torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device))
                ref["mu"], ref["sigma"] = stats.compute()
            self.reference = (ref["mu"], ref["sigma"])
        return self.reference

    @torch.no_grad()
    def run(self, ema, step: int, monitor) -> dict:
        """Collective: every rank must call it at the same step, with its part of `ema` (a ShardedEMA)."""
        start = time.perf_counter()
        model = gather_ema_model(ema, self.arch, self.device)
        # without Inception weights only the grid is wanted: sample just its images
        count = self.spec.num_images if self.inception is not None else min(self.spec.num_images, GRID_IMAGES)
        stats = InceptionStats(self.inception) if self.inception is not None else None
        grid, evaluations = self._sample(model, count, stats)
        sums = [torch.tensor(float(evaluations), dtype=torch.float64, device=self.device)]
        if stats is not None:
            sums += [stats.count, stats.total, stats.outer]
        if dist.is_initialized():
            for tensor in sums:
                dist.all_reduce(tensor)
            # the grid's images come from every rank: the same grid whatever the world size
            everyone = [None] * self.world if self.rank == 0 else None
            dist.gather_object(grid, everyone, dst=0)
            grid = [item for part in everyone for item in part] if self.rank == 0 else []
        metrics = {"eval/image_evaluations_per_image": sums[0].item() / count,
                   "eval/seconds": time.perf_counter() - start}
        if self.rank == 0:
            if stats is not None:
                mu, sigma = self._reference_stats()
                # eigh: the same value as sqrtm on full-rank statistics, 5x faster on a 2048² matrix
                metrics[f"eval/fid_{self.spec.num_images}"] = stats.fid(mu, sigma, method="eigh")
            self._report(metrics, grid, step, monitor)
        return metrics

    def _sample(self, model: PixelDiT, count: int, stats: InceptionStats | None) -> tuple[list, int]:
        """This rank's share of the plan: its (index, uint8 image) pairs of the grid, and its image evaluations."""
        s = self.spec
        plan = SamplingPlan.interleaved(range(model.num_classes), count, s.seed, s.image_size)
        grid, evaluations = [], 0
        for indices in plan.batches(s.batch_size, self.rank, self.world):
            out = plan.sample(model, indices, s.sampler, model.num_classes, self.device)
            images = to_uint8(out.images)
            evaluations += out.image_evaluations
            if stats is not None:
                stats.update(images)
            grid.extend((i, image) for i, image in zip(indices, images.cpu()) if i < GRID_IMAGES)
        return grid, evaluations

    def _report(self, metrics: dict, grid: list, step: int, monitor):
        from torchvision.utils import make_grid

        ordered = torch.stack([image for _, image in sorted(grid, key=lambda item: item[0])])
        monitor.add_images("eval/samples", make_grid(ordered, nrow=8, padding=1), step)
        monitor.add_scalars(metrics, step)
        log.info("eval at step %d: %s", step, "  ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items()))
