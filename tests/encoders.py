"""Test-sized DINOv2 weights in Meta's release layout (pretrained ones cannot be downloaded here)."""

import torch

from pixeldit.models.dinov2 import build_timm_vit

META_GRID = 37  # Meta's checkpoints carry position embeddings for 518 px = 37 x 37 patches


def meta_state_dict(dim=64, depth=2, swiglu=False, seed=0, unit_norm=True) -> dict[str, torch.Tensor]:
    """Random weights named as in dinov2_vit?14_pretrain.pth: 37x37 pos_embed, mask_token, ls1.gamma,
    and for SwiGLU (ViT-g) mlp.w12 / mlp.w3."""
    torch.manual_seed(seed)
    vit = build_timm_vit(dim, depth, max(1, dim // 64), 6.0 if swiglu else 4.0, swiglu, 224)
    state = {}
    for key, value in vit.state_dict().items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        state[key] = value.clone()
    for key in state:
        if key.endswith("gamma"):
            state[key] = torch.rand_like(state[key]) + 0.5  # layer scale of 1e-5 would hide the blocks
    state["pos_embed"] = torch.randn(1, 1 + META_GRID ** 2, dim) * 0.5
    state["mask_token"] = torch.zeros(1, dim)
    if unit_norm:
        state["norm.weight"], state["norm.bias"] = torch.ones(dim), torch.zeros(dim)
    return state


def save_meta_weights(path, **kwargs) -> str:
    torch.save(meta_state_dict(**kwargs), path)
    return str(path)
