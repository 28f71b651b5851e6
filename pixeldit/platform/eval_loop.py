"""FID in the training loop: every `eval.every_steps`, the EMA weights sample `eval.num_images`.

Images are spread over the ranks (image i on rank i mod world, label i mod num_classes, noise
from (eval.seed, i)), so the set is the same whatever the world size. Each rank feeds its uint8
samples through the FID Inception and keeps float64 sums; one all-reduce of (count, sum, sum of
outer products) gives the statistics, and rank 0 logs FID-n against the reference batch's
`mu`/`sigma`, plus a grid of the first samples (without Inception weights only the grid's
64 images are sampled). FID-n with n in the thousands is biased upwards
against FID-50k: compare runs at the same n, not with the paper's numbers.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from ..diffusion import sample, to_uint8

log = logging.getLogger("pixeldit.eval")
GRID_IMAGES = 64


class InLoopEvaluator:
    def __init__(self, cfg, device: torch.device, rank: int = 0):
        self.cfg, self.device = cfg, device
        self.inception, self.reference = None, None
        if cfg.eval.inception:
            from ..evaluation.inception import load_inception
            self.inception = load_inception(cfg.eval.inception, device)
            if rank == 0:  # before training: a missing or malformed reference fails now, not at step M
                self._reference_stats()

    def _reference_stats(self):
        """(mu, sigma) of the reference: precomputed in the file, else computed once from its images."""
        if self.reference is None:
            from ..evaluation.evaluate import InceptionStats, iter_image_batches, read_reference
            path = self.cfg.eval.reference
            ref = read_reference(path)
            if "mu" not in ref:
                stats = InceptionStats(self.inception)
                for batch in iter_image_batches(path, self.cfg.eval.batch_size):
                    stats.update(torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device))
                ref["mu"], ref["sigma"] = stats.compute()
            self.reference = (ref["mu"], ref["sigma"])
        return self.reference

    @torch.no_grad()
    def run(self, trainer) -> dict:
        """Collective: every rank must call it at the same step."""
        from .preview import gather_ema_model

        e, cfg = self.cfg.eval, self.cfg
        start = time.perf_counter()
        model = gather_ema_model(trainer)
        rank, world = trainer.rank, trainer.world
        size = cfg.data.image_size
        # without Inception weights only the grid is wanted: sample just its images
        count = e.num_images if self.inception is not None else min(e.num_images, GRID_IMAGES)
        mine = list(range(rank, count, world))
        stats = None
        if self.inception is not None:
            from ..evaluation.evaluate import InceptionStats
            stats = InceptionStats(self.inception)
        grid, evaluations = [], 0
        for first in range(0, len(mine), e.batch_size):
            indices = mine[first:first + e.batch_size]
            labels = torch.tensor(indices, dtype=torch.int64) % model.num_classes
            out = sample(model, labels, indices, (3, size, size), null_class=model.num_classes, seed=e.seed,
                         sampler=e.sampler, steps=e.steps, cfg_scale=e.cfg_scale, cfg_interval=e.cfg_interval,
                         time_shift=cfg.diffusion.time_shift, device=self.device)
            images = to_uint8(out.images)
            evaluations += out.image_evaluations
            if stats is not None:
                stats.update(images)
            grid.extend((i, image) for i, image in zip(indices, images.cpu()) if i < GRID_IMAGES)
        sums = [torch.tensor(float(evaluations), dtype=torch.float64, device=self.device)]
        if stats is not None:
            sums += [stats.count, stats.total, stats.outer]
        if dist.is_initialized():
            for tensor in sums:
                dist.all_reduce(tensor)
            # the grid's images come from every rank: the same grid whatever the world size
            everyone = [None] * world if rank == 0 else None
            dist.gather_object(grid, everyone, dst=0)
            grid = [item for part in everyone for item in part] if rank == 0 else []
        metrics = {"eval/image_evaluations_per_image": sums[0].item() / count,
                   "eval/seconds": time.perf_counter() - start}
        if stats is not None and rank == 0:
            mu, sigma = self._reference_stats()
            # eigh: the same value as sqrtm on full-rank statistics, 5x faster on a 2048² matrix
            metrics[f"eval/fid_{e.num_images}"] = stats.fid(mu, sigma, method="eigh")
        if rank == 0:
            from torchvision.utils import make_grid
            ordered = torch.stack([image for _, image in sorted(grid, key=lambda item: item[0])])
            trainer.monitor.add_images("eval/samples", make_grid(ordered, nrow=8, padding=1), trainer.state.step)
            trainer.monitor.add_scalars(metrics, trainer.state.step)
            log.info("eval at step %d: %s", trainer.state.step,
                     "  ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items()))
        return metrics
