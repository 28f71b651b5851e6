"""Analytic FLOP count of a PixelDiT forward pass (2 FLOPs per multiply-add, matmuls only).

Elementwise work (norms, modulation, activations) is left out, as FLOP counters
do; attention counts the two L×L matmuls. Training ≈ 3× forward (the backward
pass computes two matmuls for every forward one).
"""

from __future__ import annotations

from .layers import swiglu_hidden
from .pixeldit import PixelDiTArch


def forward_flops(arch: PixelDiTArch, height: int, width: int) -> dict[str, float]:
    """FLOPs per image, split by pathway."""
    p, D, C = arch.patch_size, arch.hidden_size, arch.in_channels
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
    L = (height // p) * (width // p)
    P = height * width

    def attention(n_tokens: int) -> float:
        qkv_proj = 2 * n_tokens * D * 3 * D + 2 * n_tokens * D * D
        scores_and_mix = 2 * 2 * n_tokens * n_tokens * D
        return qkv_proj + scores_and_mix

    cond = 2 * (256 * D + D * D)
    patch_block = 2 * D * 6 * D + attention(L) + 2 * L * 3 * D * swiglu_hidden(D)
    patch = cond + 2 * L * C * p * p * D + arch.patch_depth * patch_block

    if arch.variant == "dit":
        return {"patch": patch, "pixel": 0.0, "head": 2 * L * D * C * p * p,
                "total": patch + 2 * L * D * C * p * p}

    d_pix, p2 = arch.pixel_hidden_size, p * p
    n_chunks = 4 if arch.post_modulation else 6
    mod_width = n_chunks * d_pix * (p2 if arch.pixel_adaln == "pixel" else 1)
    pit_block = (2 * L * D * mod_width            # AdaLN from s_cond, one row per patch token
                 + 2 * 2 * L * p2 * d_pix * D      # compaction and expansion
                 + attention(L)
                 + 2 * P * 2 * d_pix * 4 * d_pix)  # per-pixel MLP
    pixel = 2 * P * C * d_pix + arch.pixel_depth * pit_block + 2 * P * d_pix * C
    return {"patch": patch, "pixel": pixel, "total": patch + pixel}


def training_flops(arch: PixelDiTArch, height: int, width: int) -> float:
    return 3 * forward_flops(arch, height, width)["total"]
