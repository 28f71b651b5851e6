"""Arguments of `pixeldit sample` (kept light: no torch import, so a bad flag fails fast)."""

from __future__ import annotations

import argparse

from .argument_types import positive_int

SAMPLERS = ("ab2", "euler", "heun", "sde")  # pixeldit.diffusion.SAMPLERS, without importing torch


def parse_classes(text: str) -> list[int]:
    """"0-9,17,20-29" -> [0, ..., 9, 17, 20, ..., 29]; ranges are inclusive, order is kept."""
    classes = []
    for item in text.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        try:
            if sep:
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise ValueError
                classes.extend(range(lo, hi + 1))
            else:
                classes.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: expected N or LO-HI (LO <= HI)") from None
    if len(set(classes)) != len(classes):
        raise argparse.ArgumentTypeError(f"{text!r} names a class twice")
    return classes


def add_sample_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Sample class-conditional images into an ADM-suite .npz (arr_0: uint8 N x H x W x 3 in image order, "
        "arr_1: labels). Image i has label classes[i mod len(classes)] and noise from (seed, i), so the result "
        "does not depend on the batch size or the number of processes. Interrupted runs resume from "
        "<out>.parts/. Several processes: torchrun --nproc-per-node 8 -m pixeldit sample ... "
        "The paper's 320-epoch FID setting: --sampler ab2 --steps 100 --cfg-scale 2.75 --cfg-interval 0.1 0.9 "
        "(80 epochs: --cfg-scale 3.25 --cfg-interval 0.1 1.0), 50 images per class of all 1000 classes.")
    parser.add_argument("source", help="an exported .safetensors (pixeldit export), a training run directory, "
                                       "its checkpoints folder or a step_NNNNNNNN folder, or the authors' "
                                       "Lightning .ckpt")
    parser.add_argument("--out", required=True, help="output .npz (ADM evaluation-suite format)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema",
                        help="EMA weights (default; what the paper's samples use) or the trained weights")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ab2",
                        help="ab2 (the authors' FlowDPMSolver, default), euler, heun (2N-1 evaluations), sde")
    parser.add_argument("--steps", type=positive_int, default=100, help="integration steps (paper: 100)")
    parser.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance weight w; 1 = no guidance (paper, 320 epochs: 2.75)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
                        help="guide only for LO < t < HI on the shifted t (0 = noise, 1 = data); "
                             "paper, 320 epochs: 0.1 0.9")
    parser.add_argument("--time-shift", type=float, default=None,
                        help="t -> t / (t + (1 - t) s); default: the training run's diffusion.time_shift "
                             "when the source carries it (a run or an export), else 1.0")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: the training run's data.image_size (a run or an export), else 256")
    parser.add_argument("--classes", type=parse_classes, default=None, metavar="LIST",
                        help="comma list of classes and inclusive ranges, e.g. 0-9,207 (default: all)")
    parser.add_argument("--per-class", type=positive_int, default=50, help="images per class (paper: 50)")
    parser.add_argument("--seed", type=int, default=0, help="noise of image i comes from (seed, i)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per forward, per process (guided steps push twice as many)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the model (integration stays fp32)")
    parser.add_argument("--device", default=None,
                        help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument("--grid", default=None, metavar="PATH", help="also write a PNG grid of the first 64 images")
