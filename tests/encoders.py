"""Pretrained weights cannot be downloaded here: random ones in the released layouts (DINOv2, FID Inception)."""

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


def fid_inception_state(seed=0) -> dict[str, torch.Tensor]:
    """Random weights in pytorch-fid's layout: torchvision's Inception-v3, 1008 classes, no aux head."""
    import torchvision
    layout = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in layout.state_dict().items():
        if key.endswith("num_batches_tracked"):  # absent from the converted files
            continue
        if key.endswith("conv.weight"):  # He scale keeps activations O(1) through 94 layers
            state[key] = torch.randn(value.shape, generator=g) * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 1.0 + 0.1 * torch.rand(value.shape, generator=g)
        else:
            state[key] = 0.05 * torch.randn(value.shape, generator=g)
    return state
