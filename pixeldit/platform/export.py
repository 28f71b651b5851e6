"""`pixeldit export`: consolidate a checkpoint of any strategy into one safetensors file.

Keys: `ema.<model key>` (EMA weights, what sampling uses), `model.<model key>`
(trained weights), `projector.<key>` (REPA projector); the architecture is in
the metadata, so `load_exported` rebuilds the model on one device.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..models import PixelDiT, PixelDiTArch, build_projector
from .checkpoint import latest_checkpoint, read_meta
from .ema import load_full_ema

FORMAT = "pixeldit-export-v1"


def resolve_checkpoint(path: str) -> str:
    """A run directory (its latest checkpoint), a checkpoints folder, or a step folder."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            latest = latest_checkpoint(root)
            if latest:
                return latest
    raise FileNotFoundError(f"{path}: no checkpoint (expected a run directory or checkpoints/step_NNNNNNNN)")


def _template(arch: PixelDiTArch, meta: dict) -> dict[str, torch.Tensor]:
    from .strategies import TrainModule
    config = meta["config"]
    projector = None
    if config["repa"]["mode"] != "off":
        with torch.device("meta"):
            projector = build_projector(arch.hidden_size, config["repa"]["encoder_dim"])
    with torch.device("meta"):
        module = TrainModule(PixelDiT(arch), projector)
    return module.state_dict()


def trained_weights(ckpt: str, meta: dict, template: dict) -> dict[str, torch.Tensor]:
    """The engine's fp32 weights, consolidated in this process from whatever strategy wrote them."""
    engine = os.path.join(ckpt, "engine")
    strategy = meta["strategy"]
    if strategy == "ddp":
        return torch.load(os.path.join(engine, "state.pt"), map_location="cpu", weights_only=True)["module"]
    if strategy == "fsdp":
        import torch.distributed.checkpoint as dcp
        state = {"module": {k: torch.empty(v.shape, dtype=torch.float32) for k, v in template.items()}}
        dcp.load(state, checkpoint_id=engine)
        return state["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(engine, tag="engine")


def export_checkpoint(path: str, out: str) -> dict:
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    arch = _arch_from_meta(meta)
    template = _template(arch, meta)
    weights = trained_weights(ckpt, meta, template)
    ema = load_full_ema(os.path.join(ckpt, "ema"), {k: tuple(v.shape) for k, v in template.items()})
    tensors = {}
    for key in template:
        if key.startswith("model."):
            tensors[key] = weights[key].float().contiguous()
            tensors["ema." + key[len("model."):]] = ema[key].contiguous()
        else:
            tensors[key] = weights[key].float().contiguous()  # projector.*
    metadata = {"format": FORMAT, "arch": json.dumps(dataclasses.asdict(arch)), "step": str(meta["step"]),
                "strategy": meta["strategy"], "source": os.path.abspath(ckpt)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    return metadata


def _arch_from_meta(meta: dict) -> PixelDiTArch:
    from ..models import resolve_arch
    model = dict(meta["model"])
    return resolve_arch(model.pop("name"), **model)


def load_exported(path: str, weights: str = "ema", device="cpu") -> PixelDiT:
    """A PixelDiT with the exported `ema` (default) or `model` weights."""
    from safetensors import safe_open

    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r}: expected 'ema' or 'model'")
    with safe_open(path, framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a pixeldit export (format={metadata.get('format')!r})")
        arch = PixelDiTArch(**json.loads(metadata["arch"]))
        prefix = weights + "."
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    model = PixelDiT(arch).to(device)
    model.load_state_dict(state, strict=True)
    return model.eval()
