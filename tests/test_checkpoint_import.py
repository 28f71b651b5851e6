"""Import of the authors' Lightning checkpoints, tested on a state dict built from their layout."""

import pytest
import torch

from pixeldit.models import (PixelDiT, build_model, build_projector, import_authors_state_dict, infer_arch,
                             load_authors_checkpoint, resolve_arch)
from pixeldit.models.layers import swiglu_hidden


def authors_denoiser(arch, gen):
    """Tensors named and shaped as in the authors' release (docs/pixeldit.md) (not from our module)."""
    D, p, dp, C = arch.hidden_size, arch.patch_size, arch.pixel_hidden_size, 3
    dh = D // arch.num_heads
    p2 = p * p
    hid = swiglu_hidden(D)
    chunks = 4 if arch.post_modulation else 6
    shapes = {
        "s_embedder.proj.weight": (D, C * p2), "s_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (arch.num_classes + 1, D),
        "pixel_embedder.proj.weight": (dp, C), "pixel_embedder.proj.bias": (dp,),
        "final_layer.norm.weight": (dp,), "final_layer.linear.weight": (C, dp), "final_layer.linear.bias": (C,),
    }
    for i in range(arch.patch_depth):
        b = f"patch_blocks.{i}."
        shapes |= {b + "norm1.weight": (D,), b + "norm2.weight": (D,), b + "attn.qkv.weight": (3 * D, D),
                   b + "attn.q_norm.weight": (dh,), b + "attn.k_norm.weight": (dh,),
                   b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                   b + "mlp.w1.weight": (hid, D), b + "mlp.w3.weight": (hid, D), b + "mlp.w2.weight": (D, hid),
                   b + "adaLN_modulation.0.weight": (6 * D, D), b + "adaLN_modulation.0.bias": (6 * D,)}
    for j in range(arch.pixel_depth):
        b = f"pixel_blocks.{j}."
        shapes |= {b + "compress_to_attn.weight": (D, p2 * dp), b + "compress_to_attn.bias": (D,),
                   b + "expand_from_attn.weight": (p2 * dp, D), b + "expand_from_attn.bias": (p2 * dp,),
                   b + "norm1.weight": (dp,), b + "norm2.weight": (dp,), b + "attn.qkv.weight": (3 * D, D),
                   b + "attn.q_norm.weight": (dh,), b + "attn.k_norm.weight": (dh,),
                   b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                   b + "mlp.fc1.weight": (4 * dp, dp), b + "mlp.fc1.bias": (4 * dp,),
                   b + "mlp.fc2.weight": (dp, 4 * dp), b + "mlp.fc2.bias": (dp,),
                   b + "adaLN_modulation.0.weight": (chunks * p2 * dp, D),
                   b + "adaLN_modulation.0.bias": (chunks * p2 * dp,)}
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def authors_checkpoint(arch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix in ("denoiser.", "ema_denoiser."):
        sd |= {prefix + k: v for k, v in authors_denoiser(arch, gen).items()}
    D = arch.hidden_size
    for i, shape in ((0, (D, D)), (2, (D, D)), (4, (768, D))):
        sd[f"diffusion_trainer.proj.0.{i}.weight"] = torch.randn(shape, generator=gen) * 0.05
        sd[f"diffusion_trainer.proj.0.{i}.bias"] = torch.randn(shape[0], generator=gen) * 0.05
    return {"state_dict": sd, "epoch": 80, "global_step": 400000, "hyper_parameters": {"lr": 1e-4}}


@pytest.mark.parametrize("overrides", [{}, {"post_modulation": True}, {"pixel_adaln": "pixel", "pixel_depth": 3}])
def test_import_round_trip_into_our_model(overrides):
    arch = resolve_arch("pixeldit-tiny", **overrides)
    ckpt = authors_checkpoint(arch)
    out = import_authors_state_dict(ckpt)
    assert out["arch"] == arch  # read off the shapes alone
    model = PixelDiT(out["arch"])
    model.load_state_dict(out["ema"], strict=True)
    assert torch.equal(model.y_embedder.embedding_table.weight, ckpt["state_dict"]["ema_denoiser.y_embedder.embedding_table.weight"])
    assert not torch.equal(out["model"]["s_embedder.proj.weight"], out["ema"]["s_embedder.proj.weight"])
    projector = build_projector(arch.hidden_size, 768)
    projector.load_state_dict(out["projector"], strict=True)
    x = torch.randn(2, 3, 16, 16)
    v = model(x, torch.rand(2), torch.tensor([0, 10]))
    assert v.shape == x.shape and v.abs().sum() > 0


def test_infer_arch_reads_heads_from_the_qk_norm():
    arch = resolve_arch("pixeldit-tiny", num_heads=2)
    assert infer_arch(authors_denoiser(arch, torch.Generator())).num_heads == 2


def test_missing_key_is_named():
    ckpt = authors_checkpoint(resolve_arch("pixeldit-tiny"))
    del ckpt["state_dict"]["ema_denoiser.patch_blocks.1.attn.k_norm.weight"]
    with pytest.raises(KeyError, match=r"ema_denoiser\.\*: missing keys \['patch_blocks\.1\.attn\.k_norm\.weight'\]"):
        import_authors_state_dict(ckpt)


def test_unexpected_key_is_named():
    ckpt = authors_checkpoint(resolve_arch("pixeldit-tiny"))
    ckpt["state_dict"]["denoiser.patch_blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected keys \['patch_blocks\.0\.attn\.extra'\]"):
        import_authors_state_dict(ckpt)
    ckpt = authors_checkpoint(resolve_arch("pixeldit-tiny"))
    ckpt["state_dict"]["optimizer.momentum"] = torch.zeros(1)
    with pytest.raises(KeyError, match="optimizer.momentum"):
        import_authors_state_dict(ckpt)
    ckpt = authors_checkpoint(resolve_arch("pixeldit-tiny"))
    del ckpt["state_dict"]["diffusion_trainer.proj.0.4.bias"]
    with pytest.raises(KeyError, match=r"diffusion_trainer.proj.0.\*: missing keys \['4.bias'\]"):
        import_authors_state_dict(ckpt)


def test_wrong_shape_is_named():
    arch = resolve_arch("pixeldit-tiny")
    ckpt = authors_checkpoint(arch)
    ckpt["state_dict"]["denoiser.pixel_blocks.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"pixel_blocks\.1\.mlp\.fc1\.weight has shape \(3, 3\)"):
        import_authors_state_dict(ckpt)
    # an explicit arch that disagrees with the weights is refused too
    with pytest.raises(ValueError, match="shape"):
        import_authors_state_dict(authors_checkpoint(arch), resolve_arch("pixeldit-tiny", hidden_size=32))


def test_load_from_a_lightning_file(tmp_path):
    arch = resolve_arch("pixeldit-tiny")
    ckpt = authors_checkpoint(arch, seed=3)
    path = tmp_path / "pixeldit_c2i.ckpt"
    torch.save(ckpt, path)
    out = load_authors_checkpoint(path)
    model = build_model("pixeldit-tiny")
    model.load_state_dict(out["ema"])
    assert torch.equal(model.final_layer.linear.bias, ckpt["state_dict"]["ema_denoiser.final_layer.linear.bias"])
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_authors_checkpoint(tmp_path / "missing.ckpt")
    del ckpt["state_dict"]["denoiser.final_layer.norm.weight"]
    torch.save(ckpt, path)
    with pytest.raises(KeyError, match=r"pixeldit_c2i.ckpt: .*final_layer\.norm\.weight"):
        load_authors_checkpoint(path)


def test_full_size_layout_matches_on_meta():
    """Our XL model's names and shapes are exactly the authors' layout (checked without allocating)."""
    arch = resolve_arch("pixeldit-xl")
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_model("pixeldit-xl").state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in authors_denoiser(arch, None).items()}
    assert ours == theirs
