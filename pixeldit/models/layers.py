"""Building blocks shared by the patch and pixel pathways.

Everything here is a plain ``nn.Module`` or a pure function; position tables are
computed once per (grid, device) and cached, never rebuilt per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm that normalises in float32, casts back, then applies the weight.

    The order (cast before the weight multiply) matches the reference and keeps
    bf16 activations from losing the normalisation's precision.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x·(1 + scale) + shift, as x + x·scale + shift: two full-size kernels where the literal form takes
    three (the per-pixel AdaLN's scale is as large as x)."""
    return torch.addcmul(x, x, scale).add_(shift)


def gated(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The gated residual x + gate·update in one kernel."""
    return torch.addcmul(x, gate, update)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10.0) -> torch.Tensor:
    """[cos(t·f), sin(t·f)] with f_k = max_period^(-k/half); t stays in [0, 1].

    The small max_period (10, not 10000) is the reference's choice for t in [0, 1]:
    with 10000 most frequencies would barely move across the whole range.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t, self.freq_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class ClassEmbedder(nn.Module):
    """num_classes + 1 rows; the last row is the null class used for CFG."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Linear(nn.Module):
    """A named wrapper so checkpoint keys read `<name>.proj.weight` like the reference."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# ---------------------------------------------------------------- position tables

def rope_angles(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (L, head_dim/2) for 2D RoPE on a grid_h × grid_w token grid.

    Positions are scaled to [0, 16] whatever the grid, so a model trained at one
    resolution sees the same position range at another. Pairs alternate between
    x (even pair index) and y (odd pair index) frequencies.
    """
    if head_dim % 4:
        raise ValueError(f"head dim {head_dim} must be divisible by 4 for 2D RoPE")
    n_freq = head_dim // 4
    k = torch.arange(n_freq, dtype=torch.float64)
    freqs = 1.0 / theta ** (4 * k / head_dim)
    xs = torch.linspace(0, 16, grid_w, dtype=torch.float64)
    ys = torch.linspace(0, 16, grid_h, dtype=torch.float64)
    # token index = row * grid_w + col, the unfold order
    x_pos = xs.repeat(grid_h)
    y_pos = ys.repeat_interleave(grid_w)
    ax = x_pos[:, None] * freqs[None]
    ay = y_pos[:, None] * freqs[None]
    return torch.stack([ax, ay], dim=-1).reshape(grid_h * grid_w, head_dim // 2).float()


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) by the tabled angles.

    x: (B, heads, L, d); rotation: (L, d/2, 2) float32 [cos, sin]. Computed in float32 so bf16
    inputs keep the rotation exact enough; the result is cast back. Eager runs treat each pair as a
    complex number times the phasor cos + i·sin: one kernel where real arithmetic takes eight.
    Inductor has no complex code generation, so a compiled graph gets the real form, which it fuses.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        a, b, cos, sin = pairs[..., 0], pairs[..., 1], rotation[..., 0], rotation[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
    return torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotation)).flatten(-2).to(x.dtype)


def pixel_sincos_embedding(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (H·W, dim): first half columns, second half rows."""
    if dim % 4:
        raise ValueError(f"pixel hidden size {dim} must be divisible by 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    cols = torch.arange(width, dtype=torch.float64).repeat(height)
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)
    return torch.cat([encode(cols), encode(rows)], dim=-1).float()


class RopeTable:
    """The (L, head_dim/2, 2) [cos, sin] rotation table, in a plain object rather than as a tensor
    argument: FSDP casts the floating-point tensors among a wrapped block's inputs to its compute
    dtype, and a table rounded to bf16 would blur the positions it encodes."""

    __slots__ = ("rotation",)

    def __init__(self, rotation: torch.Tensor):
        self.rotation = rotation


class PositionTables:
    """Per-(kind, grid, device) cache of position tables, shared by every block.

    Kept outside the module's state so it never lands in a checkpoint and never
    gets sharded by FSDP.
    """

    def __init__(self):
        self._tables: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def rope(self, head_dim: int, grid_h: int, grid_w: int, device: torch.device):
        key = ("rope", head_dim, grid_h, grid_w, device)
        if key not in self._tables:
            angles = rope_angles(head_dim, grid_h, grid_w)
            self._tables[key] = (RopeTable(torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).to(device)),)
        return self._tables[key][0]

    def pixels(self, dim: int, height: int, width: int, device: torch.device):
        key = ("pix", dim, height, width, device)
        if key not in self._tables:
            self._tables[key] = (pixel_sincos_embedding(dim, height, width).to(device),)
        return self._tables[key][0]


# ---------------------------------------------------------------- attention and MLPs

class Attention(nn.Module):
    """Multi-head self-attention with QK RMSNorm and 2D RoPE, on fused SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = apply_rope(self.q_norm(q), rope.rotation)
        k = apply_rope(self.k_norm(k), rope.rotation)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PixelMLP(nn.Module):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def swiglu_hidden(dim: int) -> int:
    return int(2 / 3 * 4 * dim)
