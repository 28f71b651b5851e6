"""EMA sample grids during and after training: few images, fixed seeds and classes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..diffusion import to_uint8
from ..evaluation.sampling_plan import SamplerSettings, SamplingPlan
from ..models import PixelDiT, PixelDiTArch


@dataclass(frozen=True)
class PreviewSpec:
    """What a preview needs of the run."""
    image_size: int
    steps: int            # AB2 steps (logging.sample_steps)
    time_shift: float
    folder: str           # where the PNGs go: <run dir>/samples
    arch: PixelDiTArch
    device: torch.device
    rank: int


def preview_spec(cfg, run_dir: str, arch: PixelDiTArch, device: torch.device, rank: int) -> PreviewSpec:
    """`cfg` (a Config) as the preview needs it."""
    return PreviewSpec(image_size=cfg.data.image_size, steps=cfg.logging.sample_steps,
                       time_shift=cfg.diffusion.time_shift, folder=os.path.join(run_dir, "samples"), arch=arch,
                       device=device, rank=rank)


def gather_ema_model(ema, arch: PixelDiTArch, device: torch.device) -> PixelDiT:
    """A plain model holding the full EMA weights of `ema` (a ShardedEMA), on every rank (collective when sharded)."""
    pieces = [(f.name, f.start, shadow.cpu()) for f, shadow in zip(ema.fragments, ema.shadow)]
    if dist.is_initialized() and not ema.replicated:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, pieces)
        pieces = [p for rank_pieces in everyone for p in rank_pieces]
    shapes = {f.name: f.shape for f in ema.fragments}
    flat = {name: torch.zeros(torch.Size(shape).numel()) for name, shape in shapes.items()}
    for name, start, tensor in pieces:
        flat[name][start:start + tensor.numel()] = tensor
    model = PixelDiT(arch)
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v.view(shapes[k]) for k, v in flat.items() if k.startswith(prefix)})
    return model.to(device).eval()


def preview_grid(model: PixelDiT, image_size: int, steps: int, per_class: int = 4, seed: int = 1234,
                 time_shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 (3, H', W') grid: one row per class (up to 10), `per_class` fixed seeds each; the float
    images and their labels."""
    from torchvision.utils import make_grid

    plan = SamplingPlan.class_rows(range(min(model.num_classes, 10)), per_class, seed, image_size)
    out = plan.sample(model, list(range(len(plan))), SamplerSettings("ab2", steps, time_shift=time_shift),
                      model.num_classes, next(model.parameters()).device)
    return make_grid(to_uint8(out.images).cpu(), nrow=per_class, padding=1), out.images.cpu(), plan.labels


def write_preview(spec: PreviewSpec, ema, step: int, monitor, tag: str = "ema") -> str | None:
    """Sample a grid with the EMA weights (collective); rank 0 writes a PNG and hands the grid to `monitor`."""
    from PIL import Image

    model = gather_ema_model(ema, spec.arch, spec.device)
    if spec.rank != 0:
        return None
    grid, _, _ = preview_grid(model, spec.image_size, spec.steps, time_shift=spec.time_shift)
    os.makedirs(spec.folder, exist_ok=True)
    path = os.path.join(spec.folder, f"{tag}_step_{step:08d}.png")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    monitor.add_images(f"samples/{tag}", grid, step)
    return path
