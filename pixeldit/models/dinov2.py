"""The frozen DINOv2 encoder behind REPA's targets, built with timm.

`DinoV2Encoder(images)` takes images in [−1, 1] at the training resolution and
returns the patch tokens after the final norm (DINOv2's x_norm_patchtokens),
(B, (H/16)·(W/16), C): the input is mapped to [0, 1], normalised with the
ImageNet mean/std, then resized bicubic to 14·H/16, so a 256² image gives
224² input and 16×16 tokens, one per PixelDiT patch.

Weights come from Meta's release layout (`dinov2_vitb14_pretrain.pth`: pos_embed
for 518 px, mask_token, SwiGLU `w12`/`w3` in ViT-g) or timm's. The position
embedding is resized once, at load, exactly as Meta's code does it at run time
(bicubic with scale factor (16 + 0.1)/37, no antialias); timm's default
antialiased resample moves the features by about 2%.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MissingFileError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"
# name -> (embed_dim, depth, heads, timm model); head width is 64 throughout the family
SIZES = {
    "dinov2_vits14": (384, 12, 6, "vit_small_patch14_dinov2"),
    "dinov2_vitb14": (768, 12, 12, "vit_base_patch14_dinov2"),
    "dinov2_vitl14": (1024, 24, 16, "vit_large_patch14_dinov2"),
    "dinov2_vitg14": (1536, 40, 24, "vit_giant_patch14_dinov2"),
}
PATCH = 14
META_GRID_OFFSET = 0.1  # Meta's interpolate_offset: sampling scale (grid + 0.1) / 37, not grid / 37


def encoder_input_size(image_size: int) -> int:
    if image_size % 16:
        raise ValueError(f"image size {image_size} is not a multiple of PixelDiT's patch 16")
    return PATCH * image_size // 16


def resize_pos_embed_like_meta(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M², C) → (1, 1 + grid², C), as DINOv2's interpolate_pos_encoding computes it."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    M = math.isqrt(patches.shape[1])
    if M * M != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    if M == grid:
        return pos_embed
    scale = (grid + META_GRID_OFFSET) / M
    image = patches.float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
    out = F.interpolate(image, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if out.shape[-2:] != (grid, grid):
        raise AssertionError(f"Meta-style resize gave {tuple(out.shape[-2:])}, expected {grid}x{grid}")
    return torch.cat([cls.float(), out.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1).to(pos_embed.dtype)


def to_timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's names → timm's (they agree except ViT-g's SwiGLU and the unused mask token)."""
    out = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    return out


def infer_size(state: dict[str, torch.Tensor], where: str) -> dict:
    """timm constructor arguments from a state dict's shapes (works for test-sized encoders too)."""
    try:
        dim = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{where}: not a DINOv2 state dict (missing {e})") from None
    if patch != PATCH:
        raise WeightsError(f"{where}: patch size {patch}, DINOv2 uses {PATCH}")
    swiglu = "blocks.0.mlp.fc2.weight" in state and state["blocks.0.mlp.fc2.weight"].shape[1] * 2 == hidden
    return {"embed_dim": dim, "depth": depth, "num_heads": max(1, dim // 64), "swiglu": swiglu,
            "mlp_ratio": hidden / dim}  # timm sizes fc1 (both halves, for SwiGLU) as dim · mlp_ratio


def build_timm_vit(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, swiglu: bool, image_size: int):
    import timm
    from timm.layers import SwiGLUPacked

    kwargs = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU} if swiglu else {}
    # vit_base_patch14_dinov2 brings DINOv2's settings (LayerNorm eps 1e-6, layer scale, cls token
    # inside the position table); the sizes are overridden so one constructor covers every width
    return timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=encoder_input_size(image_size),
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             num_classes=0, global_pool="", **kwargs)


def read_state_dict(weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, description) from a local file or a `dinov2_vit?14` hub name."""
    if weights in SIZES and not os.path.exists(weights):
        url = META_URL.format(name=weights)
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except OSError as e:  # URLError, timeouts, refused connections: offline machines are common
            raise WeightsError(f"repa.encoder={weights}: could not fetch {url} ({type(e).__name__}: {e}); "
                               f"download it elsewhere and set repa.encoder (or --encoder) to the file") from e
        return state, url
    if not os.path.exists(weights):
        raise MissingFileError(f"repa.encoder={weights}: no such file (or a hub name: {', '.join(SIZES)})")
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(weights)
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # a bad pickle, a bad zip, a short file
            raise WeightsError(f"repa.encoder={weights}: not a torch state dict ({type(e).__name__}: {e})") from None
    for wrapper in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"repa.encoder={weights}: expected a state dict, found {type(state).__name__}")
    return state, os.path.abspath(weights)


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """A content hash of the weights (names, shapes and values), recorded in feature manifests."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class DinoV2Encoder(nn.Module):
    """Frozen DINOv2: images in [−1, 1] → patch tokens after the final norm, (B, T, C)."""

    def __init__(self, vit: nn.Module, image_size: int, name: str = "", weights: str = "", digest: str = ""):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.image_size, self.input_size = image_size, encoder_input_size(image_size)
        self.name, self.weights, self.digest = name, weights, digest
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.vit.embed_dim

    @property
    def tokens(self) -> int:
        return (self.input_size // PATCH) ** 2

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never dropout / never updated

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"encoder built for {self.image_size}² images, got {tuple(images.shape[-2:])}")
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        dtype = next(self.vit.parameters()).dtype
        tokens = self.vit.forward_features(x.to(dtype))
        return tokens[:, self.vit.num_prefix_tokens:].float()


def load_dinov2(weights: str, image_size: int = 256, device="cpu", dtype=torch.float32) -> DinoV2Encoder:
    """A frozen encoder from Meta's or timm's weights (a file or a `dinov2_vit?14` hub name)."""
    state, where = read_state_dict(weights)
    digest = state_dict_digest(state)
    state = to_timm_layout(state)
    size = infer_size(state, where)
    vit = build_timm_vit(image_size=image_size, **size)
    grid = encoder_input_size(image_size) // PATCH
    state["pos_embed"] = resize_pos_embed_like_meta(state["pos_embed"], grid)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{where}: does not fit DINOv2 (embed {size['embed_dim']}, depth {size['depth']}): "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    name = next((n for n, s in SIZES.items() if s[:2] == (size["embed_dim"], size["depth"])),
                f"dinov2-custom-{size['embed_dim']}x{size['depth']}")
    encoder = DinoV2Encoder(vit, image_size, name, where, digest).to(device)
    # only the ViT takes `dtype`: the mean/std buffers stay fp32 (bf16 would round 0.485 to 0.484)
    encoder.vit.to(dtype)
    return encoder
