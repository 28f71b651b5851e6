"""EMA sample grids during and after training: few images, fixed seeds and classes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..diffusion import sample, to_uint8
from ..models import PixelDiT


def gather_ema_model(trainer) -> PixelDiT:
    """A plain model holding the full EMA weights, on every rank (collective when sharded)."""
    ema = trainer.ema
    pieces = [(f.name, f.start, shadow.cpu()) for f, shadow in zip(ema.fragments, ema.shadow)]
    if dist.is_initialized() and not ema.replicated:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, pieces)
        pieces = [p for rank_pieces in everyone for p in rank_pieces]
    shapes = {f.name: f.shape for f in ema.fragments}
    flat = {name: torch.zeros(torch.Size(shape).numel()) for name, shape in shapes.items()}
    for name, start, tensor in pieces:
        flat[name][start:start + tensor.numel()] = tensor
    model = PixelDiT(trainer.arch)
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v.view(shapes[k]) for k, v in flat.items() if k.startswith(prefix)})
    return model.to(trainer.device).eval()


def preview_grid(model: PixelDiT, image_size: int, steps: int, per_class: int = 4, seed: int = 1234,
                 time_shift: float = 1.0) -> torch.Tensor:
    """uint8 (3, H', W') grid: one row per class (up to 10), `per_class` fixed seeds each."""
    from torchvision.utils import make_grid

    classes = min(model.num_classes, 10)
    labels = torch.arange(classes).repeat_interleave(per_class)
    out = sample(model, labels, range(len(labels)), (3, image_size, image_size), null_class=model.num_classes,
                 seed=seed, sampler="ab2", steps=steps, time_shift=time_shift,
                 device=next(model.parameters()).device)
    return make_grid(to_uint8(out.images).cpu(), nrow=per_class, padding=1), out.images.cpu(), labels


def write_preview(trainer, tag: str = "ema") -> str | None:
    """Sample a grid with the EMA weights; rank 0 writes a PNG and a TensorBoard image."""
    from PIL import Image

    model = gather_ema_model(trainer)
    if trainer.rank != 0:
        return None
    cfg = trainer.cfg
    grid, _, _ = preview_grid(model, cfg.data.image_size, cfg.logging.sample_steps,
                              time_shift=cfg.diffusion.time_shift)
    folder = os.path.join(trainer.run_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{tag}_step_{trainer.state.step:08d}.png")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    trainer.monitor.add_images(f"samples/{tag}", grid, trainer.state.step)
    return path
