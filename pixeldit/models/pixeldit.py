"""PixelDiT: a patch-level DiT that conditions a pixel-level transformer.

Shapes: B images of H×W, patch size p, L = (H/p)(W/p) patch tokens of width D,
B·L groups of p² pixel tokens of width D_pix. The facts (chunk orders, RoPE
pairing, embeddings, init) follow the paper and the authors' release (docs/pixeldit.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import (
    Attention,
    ClassEmbedder,
    Linear,
    PixelMLP,
    PositionTables,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    gated,
    modulate,
    swiglu_hidden,
)

VARIANTS = ("pixeldit", "dit")
PIXEL_ADALN = ("pixel", "patch")


@dataclass(frozen=True)
class PixelDiTArch:
    """Everything that fixes the parameter shapes of a PixelDiT model."""

    patch_depth: int = 26
    pixel_depth: int = 4
    hidden_size: int = 1152
    pixel_hidden_size: int = 16
    num_heads: int = 16
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    # "pixeldit": the dual-level model; "dit": vanilla DiT/p with a linear unpatchify head
    variant: str = "pixeldit"
    # "pixel": per-pixel AdaLN (paper variant C, default); "patch": one vector per patch (variant B)
    pixel_adaln: str = "pixel"
    # authors' fix for loss spikes: PiT outputs are modulated, inputs only normalised, no gates
    post_modulation: bool = False

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"model.variant={self.variant!r}: expected one of {VARIANTS}")
        if self.pixel_adaln not in PIXEL_ADALN:
            raise ConfigError(f"model.pixel_adaln={self.pixel_adaln!r}: expected one of {PIXEL_ADALN}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"head size {self.hidden_size // self.num_heads} must be divisible by 4 (2D RoPE)")
        if self.variant == "pixeldit" and self.pixel_depth < 1:
            raise ConfigError("model.pixel_depth must be >= 1 for the pixeldit variant (use variant=dit)")
        for name in ("patch_depth", "hidden_size", "pixel_hidden_size", "num_heads", "patch_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")


PRESETS: dict[str, PixelDiTArch] = {
    "pixeldit-b": PixelDiTArch(patch_depth=12, pixel_depth=2, hidden_size=768, num_heads=12),
    "pixeldit-l": PixelDiTArch(patch_depth=22, pixel_depth=4, hidden_size=1024, num_heads=16),
    "pixeldit-xl": PixelDiTArch(patch_depth=26, pixel_depth=4, hidden_size=1152, num_heads=16),
    # test and demo sizes: same code paths, seconds on a CPU
    "pixeldit-tiny": PixelDiTArch(patch_depth=4, pixel_depth=2, hidden_size=64, pixel_hidden_size=8,
                                  num_heads=4, patch_size=4, num_classes=10),
    "pixeldit-small": PixelDiTArch(patch_depth=8, pixel_depth=2, hidden_size=256, pixel_hidden_size=16,
                                   num_heads=4, patch_size=8, num_classes=100),
}


def resolve_arch(name: str, **overrides) -> PixelDiTArch:
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    fields = {f.name for f in dataclasses.fields(PixelDiTArch)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model override(s) {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def build_model(name: str, **overrides) -> "PixelDiT":
    return PixelDiT(resolve_arch(name, **overrides))


class PatchBlock(nn.Module):
    """Augmented DiT block: AdaLN-modulated attention and SwiGLU, gated residuals."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim))
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1))
        x = gated(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope))
        return gated(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class PiTBlock(nn.Module):
    """Pixel transformer block on (B·L, p², D_pix) pixel tokens.

    Attention runs on compacted patch tokens (Pixel Token Compaction): each
    patch's p²·D_pix values are projected to D, attended over the L patches, and
    expanded back. The MLP is per pixel.
    """

    def __init__(self, arch: PixelDiTArch):
        super().__init__()
        p2, d_pix, dim = arch.patch_size ** 2, arch.pixel_hidden_size, arch.hidden_size
        self.post_modulation = arch.post_modulation
        self.per_pixel = arch.pixel_adaln == "pixel"
        self.n_chunks = 4 if arch.post_modulation else 6
        self.p2, self.d_pix = p2, d_pix
        self.norm1 = RMSNorm(d_pix)
        self.compress_to_attn = nn.Linear(p2 * d_pix, dim)
        self.attn = Attention(dim, arch.num_heads)
        self.expand_from_attn = nn.Linear(dim, p2 * d_pix)
        self.norm2 = RMSNorm(d_pix)
        self.mlp = PixelMLP(d_pix)
        mod_out = self.n_chunks * d_pix * (p2 if self.per_pixel else 1)
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, mod_out))

    def forward(self, x: torch.Tensor, s_cond: torch.Tensor, rope, batch: int) -> torch.Tensor:
        BL = x.shape[0]
        mod = self.adaLN_modulation(s_cond)
        # pixel-wise: (B·L, p², n·D_pix), every pixel its own shift/scale/gate;
        # patch-wise: (B·L, 1, n·D_pix), broadcast over the patch's pixels
        mod = mod.view(BL, self.p2 if self.per_pixel else 1, self.n_chunks * self.d_pix)
        chunks = mod.chunk(self.n_chunks, dim=-1)
        if self.post_modulation:
            scale1, shift1, scale2, shift2 = chunks
            attn_in = self.norm1(x)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
            attn_in = modulate(self.norm1(x), shift_msa, scale_msa)
        tokens = self.compress_to_attn(attn_in.reshape(batch, BL // batch, self.p2 * self.d_pix))
        attn_out = self.expand_from_attn(self.attn(tokens, rope)).view(BL, self.p2, self.d_pix)
        if self.post_modulation:
            x = x + attn_out * (1 + scale1) + shift1
            return x + self.mlp(self.norm2(x)) * (1 + scale2) + shift2
        x = gated(x, gate_msa, attn_out)
        return gated(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class PixelDiT(nn.Module):
    def __init__(self, arch: PixelDiTArch):
        super().__init__()
        self.arch = arch
        p, C, D = arch.patch_size, arch.in_channels, arch.hidden_size
        self.num_classes = arch.num_classes
        self.s_embedder = Linear(C * p * p, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = ClassEmbedder(arch.num_classes, D)
        self.patch_blocks = nn.ModuleList(PatchBlock(D, arch.num_heads) for _ in range(arch.patch_depth))
        if arch.variant == "pixeldit":
            self.pixel_embedder = Linear(C, arch.pixel_hidden_size)
            self.pixel_blocks = nn.ModuleList(PiTBlock(arch) for _ in range(arch.pixel_depth))
            self.final_layer = FinalLayer(arch.pixel_hidden_size, C)
        else:
            self.pixel_blocks = nn.ModuleList()
            self.final_layer = FinalLayer(D, C * p * p)
        self.positions = PositionTables()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.xavier_uniform_(self.s_embedder.proj.weight)
        nn.init.zeros_(self.s_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in [*self.patch_blocks, *self.pixel_blocks]:
            nn.init.zeros_(block.adaLN_modulation[0].weight)
            nn.init.zeros_(block.adaLN_modulation[0].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------ input checks

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        p = self.arch.patch_size
        if x.dim() != 4 or x.shape[1] != self.arch.in_channels:
            raise ValueError(f"x must be (B, {self.arch.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        B = x.shape[0]
        if t.shape != (B,) or y.shape != (B,):
            raise ValueError(f"t and y must be ({B},), got t {tuple(t.shape)} and y {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an integer tensor, got {y.dtype}")
        # label values are not checked here: that needs a host sync on every forward. The loader
        # refuses out-of-range labels at the data boundary and the sampler draws only valid ones

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The velocity v = model(x, t, y)."""
        return self._forward(x, t, y, None)[0]

    def forward_with_hidden(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                            block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, the output of patch block `block`, 1-based): what REPA aligns."""
        if not 1 <= block <= len(self.patch_blocks):
            raise ValueError(f"block={block} outside 1..{len(self.patch_blocks)}")
        return self._forward(x, t, y, block)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, hidden_block: int | None):
        self._check_inputs(x, t, y)
        arch = self.arch
        p = arch.patch_size
        B, C, H, W = x.shape
        gh, gw = H // p, W // p
        rope = self.positions.rope(arch.hidden_size // arch.num_heads, gh, gw, x.device)

        t_emb = self.t_embedder(t)
        c = F.silu(t_emb + self.y_embedder(y))
        s = self.s_embedder(F.unfold(x, p, stride=p).transpose(1, 2))
        hidden = None
        for i, block in enumerate(self.patch_blocks, start=1):
            s = block(s, c, rope)
            if i == hidden_block:
                hidden = s

        if arch.variant == "dit":
            out = self.final_layer(s).transpose(1, 2)
        else:
            out = self._pixel_pathway(x, F.silu(t_emb.unsqueeze(1) + s), rope)
        return F.fold(out, (H, W), p, stride=p), hidden

    def _pixel_pathway(self, x: torch.Tensor, s_cond: torch.Tensor, rope) -> torch.Tensor:
        arch = self.arch
        p, d_pix = arch.patch_size, arch.pixel_hidden_size
        B, C, H, W = x.shape
        gh, gw = H // p, W // p
        pos = self.positions.pixels(d_pix, H, W, x.device)
        pix = self.pixel_embedder(x.permute(0, 2, 3, 1)) + pos.view(H, W, d_pix).to(x.dtype)
        # group per patch: patches in row order, pixels in row order inside a patch
        pix = pix.view(B, gh, p, gw, p, d_pix).permute(0, 1, 3, 2, 4, 5).reshape(B * gh * gw, p * p, d_pix)
        s_cond = s_cond.reshape(B * gh * gw, arch.hidden_size)
        for block in self.pixel_blocks:
            pix = block(pix, s_cond, rope, B)
        out = self.final_layer(pix)  # (B·L, p², C)
        # to fold's layout (B, C·p², L): channel-major, then pixels
        return out.view(B, gh * gw, p * p, C).permute(0, 3, 2, 1).reshape(B, C * p * p, gh * gw)

    # ------------------------------------------------------------ bookkeeping

    def parameter_groups(self) -> dict[str, int]:
        """Parameter counts per pathway (conditioning embedders count with the patch pathway)."""
        groups = {"patch": 0, "pixel": 0}
        for name, param in self.named_parameters():
            top = name.split(".")[0]
            pixel = top in ("pixel_embedder", "pixel_blocks") or (
                top == "final_layer" and self.arch.variant == "pixeldit")
            groups["pixel" if pixel else "patch"] += param.numel()
        groups["total"] = groups["patch"] + groups["pixel"]
        return groups
