"""Independent check of the PixelDiT model against the paper's and the authors' facts (docs/pixeldit.md).

`reference_forward` below is a functional forward pass written from the spec
text alone: it reads nothing but the tensors of ``model.state_dict()`` (the
authors' key layout) and a few arch numbers, and deliberately uses a different
coding style from ``pixeldit/models`` (reshapes instead of F.unfold/F.fold,
an explicit loop over heads, complex numbers for RoPE, erf for GELU, einsum for
linears) so that a shared misunderstanding is less likely.

Precision note: the spec has RMSNorm normalise in float32 and cast back, so the
reference does the same; everything else in the reference is float64. Our
model builds its RoPE / timestep / pixel position tables in float32 (a valid
implementation choice), so float64 comparisons use rtol/atol ~1e-5, which is
still many orders of magnitude below the O(0.1-1) errors a wrong chunk order,
pairing, position or layout would cause with random weights.
"""

from __future__ import annotations

import math

import pytest
import torch

from pixeldit.models import build_model
from pixeldit.models.layers import PositionTables, apply_rope, pixel_sincos_embedding, rope_angles, timestep_frequencies


# =============================================================== reference (spec only)

def _lin(sd, name, x, bias=True):
    """y = x W^T + b for a state-dict Linear ``name``."""
    y = torch.einsum("...i,oi->...o", x, sd[name + ".weight"])
    return y + sd[name + ".bias"] if bias else y


def _rmsnorm(x, w, eps=1e-6):
    # spec: normalise in float32, cast back to the input dtype, then multiply by the weight
    x32 = x.to(torch.float32)
    ms = (x32 * x32).sum(-1, keepdim=True) / x32.shape[-1]
    return (x32 / torch.sqrt(ms + eps)).to(x.dtype) * w


def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def _timestep_vector(t, dim=256, max_period=10.0):
    half = dim // 2
    f = torch.tensor([math.exp(-math.log(max_period) * k / half) for k in range(half)], dtype=torch.float64)
    a = t.to(torch.float64)[:, None] * f[None, :]  # t as it is, no x1000
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)  # cos first


def _rope_phasors(head_dim, gh, gw):
    """Unit complex numbers (L, head_dim/2): pair 2k -> x*f_k, pair 2k+1 -> y*f_k."""
    xs = torch.linspace(0, 16, gw, dtype=torch.float64)
    ys = torch.linspace(0, 16, gh, dtype=torch.float64)
    nf = head_dim // 4
    ang = torch.zeros(gh * gw, head_dim // 2, dtype=torch.float64)
    for r in range(gh):
        for c in range(gw):
            l = r * gw + c
            for k in range(nf):
                f = 1.0 / (10000.0 ** (4 * k / head_dim))
                ang[l, 2 * k] = xs[c] * f
                ang[l, 2 * k + 1] = ys[r] * f
    return torch.polar(torch.ones_like(ang), ang)


def _rotate(v, phasors):
    """(..., L, d) real -> rotate adjacent pairs (2j, 2j+1) as complex a + ib."""
    z = torch.complex(v[..., 0::2].to(torch.float64), v[..., 1::2].to(torch.float64)) * phasors
    out = torch.empty_like(v)
    out[..., 0::2] = z.real.to(v.dtype)
    out[..., 1::2] = z.imag.to(v.dtype)
    return out


def _attention(sd, pre, x, heads, phasors):
    B, L, D = x.shape
    dh = D // heads
    qkv = _lin(sd, pre + ".qkv", x, bias=False)
    q_all, k_all, v_all = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        q = _rotate(_rmsnorm(q_all[..., sl], sd[pre + ".q_norm.weight"]), phasors)  # QK-norm first, then RoPE
        k = _rotate(_rmsnorm(k_all[..., sl], sd[pre + ".k_norm.weight"]), phasors)
        v = v_all[..., sl]
        logits = torch.einsum("bid,bjd->bij", q, k) / math.sqrt(dh)
        outs.append(torch.einsum("bij,bjd->bid", torch.softmax(logits, dim=-1), v))
    return _lin(sd, pre + ".proj", torch.cat(outs, dim=-1))


def _patch_block(sd, pre, s, c, heads, phasors):
    mod = _lin(sd, pre + ".adaLN_modulation.0", c)[:, None, :]
    D = s.shape[-1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[..., i * D:(i + 1) * D] for i in range(6))
    h = _rmsnorm(s, sd[pre + ".norm1.weight"]) * (1 + scale_msa) + shift_msa
    s = s + gate_msa * _attention(sd, pre + ".attn", h, heads, phasors)
    h = _rmsnorm(s, sd[pre + ".norm2.weight"]) * (1 + scale_mlp) + shift_mlp
    ffn = _lin(sd, pre + ".mlp.w2", _silu(_lin(sd, pre + ".mlp.w1", h, False)) * _lin(sd, pre + ".mlp.w3", h, False),
               bias=False)
    return s + gate_mlp * ffn


def _pixel_pos(dpix, H, W):
    """(H, W, dpix): first half encodes the column, second half the row; each [sin, cos]."""
    q = dpix // 4
    omega = torch.tensor([10000.0 ** (-k / q) for k in range(q)], dtype=torch.float64)
    col = torch.arange(W, dtype=torch.float64)[:, None] * omega  # (W, q)
    row = torch.arange(H, dtype=torch.float64)[:, None] * omega  # (H, q)
    col_e = torch.cat([torch.sin(col), torch.cos(col)], 1)[None, :, :].expand(H, W, 2 * q)
    row_e = torch.cat([torch.sin(row), torch.cos(row)], 1)[:, None, :].expand(H, W, 2 * q)
    return torch.cat([col_e, row_e], dim=-1)


def _pit_block(sd, pre, x, s_cond, arch, B, phasors):
    BL, P2, dpix = x.shape
    n = 4 if arch.post_modulation else 6
    mod = _lin(sd, pre + ".adaLN_modulation.0", s_cond)  # (B*L, n*P2*dpix) or (B*L, n*dpix)
    if arch.pixel_adaln == "pixel":
        mod = mod.reshape(BL, P2, n * dpix)  # every pixel its own vector
    else:
        mod = mod.reshape(BL, 1, n * dpix)  # one per patch, broadcast to its pixels
    ch = [mod[..., i * dpix:(i + 1) * dpix] for i in range(n)]

    def ptc_attention(h):
        tok = _lin(sd, pre + ".compress_to_attn", h.reshape(B, BL // B, P2 * dpix))  # pixel-major flatten
        tok = _attention(sd, pre + ".attn", tok, arch.num_heads, phasors)
        return _lin(sd, pre + ".expand_from_attn", tok).reshape(BL, P2, dpix)

    def mlp(h):
        return _lin(sd, pre + ".mlp.fc2", _gelu_exact(_lin(sd, pre + ".mlp.fc1", h)))

    if arch.post_modulation:
        scale1, shift1, scale2, shift2 = ch
        x = x + ptc_attention(_rmsnorm(x, sd[pre + ".norm1.weight"])) * (1 + scale1) + shift1
        return x + mlp(_rmsnorm(x, sd[pre + ".norm2.weight"])) * (1 + scale2) + shift2
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ch
    x = x + gate_msa * ptc_attention(_rmsnorm(x, sd[pre + ".norm1.weight"]) * (1 + scale_msa) + shift_msa)
    return x + gate_mlp * mlp(_rmsnorm(x, sd[pre + ".norm2.weight"]) * (1 + scale_mlp) + shift_mlp)


def reference_forward(state_dict, arch, x, t, y, return_block=None):
    """PixelDiT forward from the spec; returns v (and the output of patch block `return_block`, 1-based)."""
    sd = state_dict
    p, heads = arch.patch_size, arch.num_heads
    B, C, H, W = x.shape
    gh, gw = H // p, W // p
    L = gh * gw
    D = sd["s_embedder.proj.weight"].shape[0]
    dpix = sd["pixel_embedder.proj.weight"].shape[0]
    phasors = _rope_phasors(D // heads, gh, gw)

    # conditioning
    tv = _timestep_vector(t).to(x.dtype)
    t_emb = _lin(sd, "t_embedder.mlp.2", _silu(_lin(sd, "t_embedder.mlp.0", tv)))
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    c = _silu(t_emb + y_emb)

    # patchify: (B, C, gh, p, gw, p) -> tokens in grid row order, values channel-major then pixel row order
    patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, L, C * p * p)
    s = _lin(sd, "s_embedder.proj", patches)
    hidden = None
    for i in range(arch.patch_depth):
        s = _patch_block(sd, f"patch_blocks.{i}", s, c, heads, phasors)
        if return_block == i + 1:
            hidden = s
    s_cond = _silu(t_emb[:, None, :] + s).reshape(B * L, D)

    # pixel tokens, grouped per patch with Tensor.unfold (patch rows, patch cols, pixel rows, pixel cols)
    pix = _lin(sd, "pixel_embedder.proj", x.permute(0, 2, 3, 1)) + _pixel_pos(dpix, H, W).to(x.dtype)
    pix = pix.permute(0, 3, 1, 2).unfold(2, p, p).unfold(3, p, p)  # (B, dpix, gh, gw, p, p)
    pix = pix.permute(0, 2, 3, 4, 5, 1).reshape(B * L, p * p, dpix)
    for j in range(arch.pixel_depth):
        pix = _pit_block(sd, f"pixel_blocks.{j}", pix, s_cond, arch, B, phasors)
    out = _lin(sd, "final_layer.linear", _rmsnorm(pix, sd["final_layer.norm.weight"]))  # (B*L, p*p, C)
    img = out.reshape(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
    return img if return_block is None else (img, hidden)


# =============================================================== helpers

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# float64 tolerance: the observed gap (our fp32 position/timestep tables, spec's fp32 RMSNorm) is ~5e-7;
# an approximate (tanh) GELU in the pixel MLP shows up as ~4e-5..1e-4, every layout/order bug as >1e-2.
TOL64 = dict(rtol=3e-6, atol=3e-6)


def _tiny(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model("pixeldit-tiny", **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "_norm." in name:
                prm.copy_(1 + 0.2 * torch.randn(prm.shape, generator=g))  # norm weights around 1
            else:
                prm.copy_(0.12 * torch.randn(prm.shape, generator=g))
    return model.to(dtype).eval()


def _inputs(model, B=2, H=32, W=48, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g).to(dtype)
    t = torch.tensor([0.13, 0.87][:B], dtype=dtype)
    y = torch.tensor([3, model.arch.num_classes][:B])  # the second one is the null class
    return x, t, y


# =============================================================== end-to-end agreement

@pytest.mark.parametrize("overrides", [{}, {"pixel_adaln": "patch"}, {"post_modulation": True},
                                       {"pixel_adaln": "patch", "post_modulation": True}],
                         ids=["default", "patch_adaln", "post_mod", "patch_adaln+post_mod"])
def test_forward_matches_reference_fp64(overrides):
    model = _tiny(**overrides)
    # non-square; the default variant at 32x48 (8x12 patch grid), the others smaller to keep the file fast
    x, t, y = _inputs(model, H=32, W=48) if not overrides else _inputs(model, H=16, W=24)
    with torch.no_grad():
        ours = model(x, t, y)
        ref = reference_forward(model.state_dict(), model.arch, x, t, y)
    assert ours.shape == ref.shape == x.shape
    assert ref.abs().mean() > 0.05  # random weights: the output is far from trivial
    torch.testing.assert_close(ours, ref, **TOL64)


def test_forward_matches_reference_fp32():
    model = _tiny(dtype=torch.float32)
    x, t, y = _inputs(model, H=16, W=24, dtype=torch.float32)
    with torch.no_grad():
        ours = model(x, t, y)
        ref = reference_forward(model.state_dict(), model.arch, x, t, y)
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-5)  # observed ~1.5e-6


def test_square_and_single_patch_row():
    """Other grid shapes: square 16x16 (4x4 grid) and a 1-row grid (RoPE linspace with 1 point)."""
    model = _tiny(seed=5)
    for H, W in ((16, 16), (4, 20)):
        x, t, y = _inputs(model, B=2, H=H, W=W)
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, y), reference_forward(model.state_dict(), model.arch, x, t, y),
                                       **TOL64)


@pytest.mark.parametrize("k", [1, 3])
def test_return_block_matches_reference(k):
    model = _tiny(seed=7)
    x, t, y = _inputs(model, H=16, W=24)
    with torch.no_grad():
        v, h = model.forward_with_hidden(x, t, y, k)
        v_ref, h_ref = reference_forward(model.state_dict(), model.arch, x, t, y, return_block=k)
    assert h.shape == (2, (16 // 4) * (24 // 4), model.arch.hidden_size)
    torch.testing.assert_close(h, h_ref, **TOL64)
    torch.testing.assert_close(v, v_ref, **TOL64)
    _, h_other = reference_forward(model.state_dict(), model.arch, x, t, y, return_block=k + 1)
    assert (h - h_other).abs().max() > 1e-2  # it really is block k, not a neighbour


def test_pixel_mlp_is_exact_gelu():
    """Pixel MLP: fc2(GELU_exact(fc1 x)); inputs in the range where the tanh approximation differs (~1e-4)."""
    mlp = _tiny(seed=11).pixel_blocks[0].mlp
    with torch.no_grad():  # identity-like fc1/fc2 so the activation is read back directly
        mlp.fc1.weight.copy_(torch.eye(32, 8))
        mlp.fc1.bias.zero_()
        mlp.fc2.weight.copy_(torch.eye(8, 32))
        mlp.fc2.bias.zero_()
        x = torch.linspace(-4, 4, 72, dtype=torch.float64).view(9, 8)
        ours = mlp(x)
    torch.testing.assert_close(ours, _gelu_exact(x), rtol=1e-12, atol=1e-12)


def test_batch_elements_independent_and_class_matters():
    model = _tiny(seed=9)
    x, t, y = _inputs(model, H=16, W=24)
    with torch.no_grad():
        full = model(x, t, y)
        one = model(x[1:], t[1:], y[1:])
        other = model(x[1:], t[1:], torch.tensor([4]))
    torch.testing.assert_close(full[1:], one, rtol=1e-9, atol=1e-9)
    assert (one - other).abs().max() > 1e-3


# =============================================================== facts

def test_timestep_frequency_vector():
    t = torch.tensor([0.0, 0.3, 1.0])
    vec = timestep_frequencies(t).double()
    assert vec.shape == (3, 256)
    for i, tv in enumerate((0.0, 0.3, 1.0)):
        for k in (0, 1, 64, 127):
            f = 10.0 ** (-k / 128)  # exp(-ln(10) k/128)
            assert vec[i, k].item() == pytest.approx(math.cos(tv * f), abs=1e-6)
            assert vec[i, 128 + k].item() == pytest.approx(math.sin(tv * f), abs=1e-6)
    # t = 1: the lowest frequency is 10^(-127/128) ~ 0.1018, not 1e-4 (max_period 10, t not scaled by 1000)
    assert vec[2, 255].item() == pytest.approx(math.sin(10 ** (-127 / 128)), abs=1e-6)
    torch.testing.assert_close(vec, _timestep_vector(t), rtol=0, atol=1e-6)


def test_rmsnorm_bf16_order():
    """Normalise in float32, cast back to bf16, then multiply by the (bf16) weight: bit-exact in bf16."""
    from pixeldit.models.layers import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(64, generator=g))
    x = (3 * torch.randn(5, 64, generator=g)).to(torch.bfloat16)
    with torch.no_grad():
        ours = norm(x)
    ref = _rmsnorm(x, norm.weight.detach())
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref)
    # the other order (weight applied in float32, one rounding) differs somewhere in bf16
    x32 = x.float()
    other = (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()).to(torch.bfloat16)
    assert not torch.equal(ref, other)


def test_rope_angles_hand_computed():
    # head_dim 8 -> 2 frequencies: 1 and 1/10000^(4/8) = 0.01; grid 3 rows x 2 cols
    ang = rope_angles(8, 3, 2).double()
    assert ang.shape == (6, 4)
    # xs = linspace(0,16,2) = [0, 16], ys = linspace(0,16,3) = [0, 8, 16]; token 3 = row 1, col 1
    torch.testing.assert_close(ang[3], torch.tensor([16.0, 8.0, 0.16, 0.08], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # token 4 = row 2, col 0
    torch.testing.assert_close(ang[4], torch.tensor([0.0, 16.0, 0.0, 0.16], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # positions are always scaled to [0, 16]: a 5-wide grid has x step 4
    assert rope_angles(4, 1, 5)[1, 0].item() == pytest.approx(4.0)
    # and agree with the complex-phasor table of the reference
    ref = torch.angle(_rope_phasors(16, 4, 6))
    ours = torch.remainder(rope_angles(16, 4, 6).double() + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_rope_rotation_hand_computed():
    phi = 0.7
    rotation = torch.tensor([[[math.cos(phi), math.sin(phi)], [1.0, 0.0]]])  # (L=1, d/2, [cos, sin])
    v = torch.tensor([[[[2.0, 3.0, 5.0, 7.0]]]])  # (B, heads, L=1, d=4)
    out = apply_rope(v, rotation)[0, 0, 0]
    c, s = math.cos(phi), math.sin(phi)
    expected = torch.tensor([2 * c - 3 * s, 2 * s + 3 * c, 5.0, 7.0])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_pixel_sincos_entry():
    H, W, row, col = 6, 9, 2, 5
    emb = pixel_sincos_embedding(8, H, W)
    assert emb.shape == (H * W, 8)
    e = emb[row * W + col].double()
    # D_pix = 8: omega = [1, 10000^(-1/2)] = [1, 0.01]
    expected = [math.sin(5), math.sin(0.05), math.cos(5), math.cos(0.05),
                math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    torch.testing.assert_close(e, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb.view(H, W, 8).double(), _pixel_pos(8, H, W), rtol=1e-6, atol=1e-6)


def test_init_facts_small():
    torch.manual_seed(0)
    model = build_model("pixeldit-small")
    a = model.arch
    for blk in [*model.patch_blocks, *model.pixel_blocks]:
        assert blk.adaLN_modulation[0].weight.abs().max() == 0
        assert blk.adaLN_modulation[0].bias.abs().max() == 0
    assert model.final_layer.linear.weight.abs().max() == 0
    assert model.final_layer.linear.bias.abs().max() == 0
    assert model.s_embedder.proj.bias.abs().max() == 0
    w = model.s_embedder.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))  # xavier uniform
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    table = model.y_embedder.embedding_table.weight
    assert table.shape == (a.num_classes + 1, a.hidden_size)  # null class row
    for t in (table, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert t.std().item() == pytest.approx(0.02, rel=0.1) and abs(t.mean().item()) < 2e-3
    # timestep-MLP biases keep PyTorch's default init (uniform, +-1/sqrt(fan_in)), not zero
    b0 = model.t_embedder.mlp[0].bias
    assert b0.abs().max() > 0 and b0.abs().max() <= 1 / math.sqrt(256)
    # other linears keep the default init: uniform within 1/sqrt(fan_in), non-zero
    qkv = model.patch_blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= 1 / math.sqrt(a.hidden_size) and qkv.std() > 0.5 / math.sqrt(3 * a.hidden_size)
    # zero-init AdaLN/final layer: a fresh model predicts exactly zero
    x = torch.randn(1, 3, 16, 16)
    assert model(x, torch.tensor([0.5]), torch.tensor([a.num_classes])).abs().max() == 0


def test_state_dict_keys_match_authors_layout():
    model = build_model("pixeldit-tiny")
    a = model.arch
    keys = {"s_embedder.proj.weight", "s_embedder.proj.bias", "y_embedder.embedding_table.weight",
            "pixel_embedder.proj.weight", "pixel_embedder.proj.bias",
            "final_layer.norm.weight", "final_layer.linear.weight", "final_layer.linear.bias"}
    keys |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    attn = ["attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.proj.weight", "attn.proj.bias",
            "norm1.weight", "norm2.weight", "adaLN_modulation.0.weight", "adaLN_modulation.0.bias"]
    for i in range(a.patch_depth):
        keys |= {f"patch_blocks.{i}.{k}" for k in attn + ["mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight"]}
    for j in range(a.pixel_depth):
        keys |= {f"pixel_blocks.{j}.{k}" for k in attn + [
            "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
            "compress_to_attn.weight", "compress_to_attn.bias", "expand_from_attn.weight", "expand_from_attn.bias"]}
    sd = model.state_dict()
    assert set(sd) == keys
    D, dp, p2 = a.hidden_size, a.pixel_hidden_size, a.patch_size ** 2
    assert sd["patch_blocks.0.mlp.w1.weight"].shape == (int(2 / 3 * 4 * D), D)
    assert sd["pixel_blocks.0.adaLN_modulation.0.weight"].shape == (6 * p2 * dp, D)
    assert build_model("pixeldit-tiny", post_modulation=True).state_dict()[
        "pixel_blocks.0.adaLN_modulation.0.weight"].shape == (4 * p2 * dp, D)
    assert build_model("pixeldit-tiny", pixel_adaln="patch").state_dict()[
        "pixel_blocks.0.adaLN_modulation.0.weight"].shape == (6 * dp, D)


@pytest.mark.parametrize("name,expected_m", [("pixeldit-b", 184.75), ("pixeldit-l", 569.65), ("pixeldit-xl", 797.38)])
def test_parameter_counts(name, expected_m):
    with torch.device("meta"):
        model = build_model(name)
    n = sum(prm.numel() for prm in model.parameters())
    assert n / 1e6 == pytest.approx(expected_m, abs=0.006)


def test_null_class_forward():
    model = _tiny()
    x, t, _ = _inputs(model, H=16, W=24)
    y = torch.full((2,), model.arch.num_classes)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(model.state_dict(), model.arch, x, t, y),
                                   **TOL64)


# =============================================================== errors

def test_bad_labels_are_not_used():
    # the model does not sync with the host to check label values (the loader refuses them at the
    # data boundary); an out-of-range label still fails in the embedding instead of reading a wrong row
    model = build_model("pixeldit-tiny")
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with pytest.raises(IndexError):
        model(x, t, torch.tensor([0, 11]))
    with pytest.raises(IndexError):
        model(x, t, torch.tensor([-1, 2]))


def test_indivisible_image_raises():
    model = build_model("pixeldit-tiny")
    with pytest.raises(ValueError, match="30"):
        model(torch.randn(1, 3, 30, 48), torch.rand(1), torch.tensor([1]))
    with pytest.raises(ValueError, match="17"):
        model(torch.randn(1, 3, 16, 17), torch.rand(1), torch.tensor([1]))


def test_unknown_model_and_override_raise():
    with pytest.raises(ValueError, match="pixeldit-huge"):
        build_model("pixeldit-huge")
    with pytest.raises(ValueError, match="no_such_field"):
        build_model("pixeldit-tiny", no_such_field=3)


def test_rope_compiled_form_equals_eager_form(monkeypatch):
    # inductor gets the real-arithmetic form (no complex code generation); eager gets the complex one
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64).float()
    rotation = PositionTables().rope(8, 1, 5, torch.device("cpu")).rotation
    eager = apply_rope(x, rotation)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rope(x, rotation), eager, rtol=1e-6, atol=1e-6)
    assert (eager - x).abs().max() > 0.1  # it rotated something
