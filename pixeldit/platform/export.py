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

from ..errors import ConfigError, MissingFileError, WeightsError
from ..models import PixelDiT, PixelDiTArch
from ..parallel import TrainModule
from ..parallel.checkpoint import latest_checkpoint, read_meta
from ..parallel.checkpoint_state import read_trained_weights
from ..parallel.ema import load_full_ema
from .repa import repa_mode

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
    raise MissingFileError(f"{path}: no checkpoint (expected a run directory or checkpoints/step_NNNNNNNN)")


def _template(arch: PixelDiTArch, meta: dict) -> dict[str, torch.Tensor]:
    """The state dict's keys and shapes of the TrainModule that wrote the checkpoint (no memory)."""
    repa = meta["config"]["repa"]
    with torch.device("meta"):
        projector = repa_mode(repa["mode"]).build_projector(arch.hidden_size, repa["encoder_dim"])
        module = TrainModule(PixelDiT(arch), projector)
    return module.state_dict()


def consolidate_checkpoint(path: str, parts=("model", "ema", "projector")) -> dict:
    """Any strategy's checkpoint -> full fp32 state dicts in this process.

    Returns {"checkpoint", "meta", "arch", "model", "ema", "projector"}: `model` and `ema` keyed as
    PixelDiT's state dict, `projector` as the REPA projector's (None without REPA). Only the
    requested parts are read: the EMA alone needs neither the engine nor ZeRO's consolidation.
    """
    unknown = set(parts) - {"model", "ema", "projector"}
    if unknown:
        raise ConfigError(f"unknown checkpoint parts {sorted(unknown)}; known: model, ema, projector")
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    arch = _arch_from_meta(meta)
    template = _template(arch, meta)
    out = {"checkpoint": ckpt, "meta": meta, "arch": arch, "model": None, "ema": None, "projector": None}

    def group(state, prefix):
        return {k[len(prefix):]: state[k].float().contiguous() for k in template if k.startswith(prefix)}

    if "model" in parts or "projector" in parts:
        weights = read_trained_weights(meta["strategy"], os.path.join(ckpt, "engine"), template)
        if "model" in parts:
            out["model"] = group(weights, "model.")
        if "projector" in parts:
            out["projector"] = group(weights, "projector.") or None
    if "ema" in parts:
        shapes = {k: tuple(v.shape) for k, v in template.items() if k.startswith("model.")}
        out["ema"] = group(load_full_ema(os.path.join(ckpt, "ema"), shapes), "model.")
    return out


def export_checkpoint(path: str, out: str) -> dict:
    from safetensors.torch import save_file

    full = consolidate_checkpoint(path)
    meta = full["meta"]
    tensors = {f"model.{k}": v for k, v in full["model"].items()}
    tensors |= {f"ema.{k}": v for k, v in full["ema"].items()}
    tensors |= {f"projector.{k}": v for k, v in (full["projector"] or {}).items()}
    config = meta["config"]
    # image size and time shift travel with the weights so that sampling an export needs no config
    metadata = {"format": FORMAT, "arch": json.dumps(dataclasses.asdict(full["arch"])), "step": str(meta["step"]),
                "strategy": meta["strategy"], "source": os.path.abspath(full["checkpoint"]),
                "image_size": str(config["data"]["image_size"]),
                "time_shift": str(config["diffusion"]["time_shift"])}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    return metadata


def _arch_from_meta(meta: dict) -> PixelDiTArch:
    from ..models import resolve_arch
    model = dict(meta["model"])
    return resolve_arch(model.pop("name"), **model)


def read_export_metadata(path: str) -> dict:
    """The metadata of one of our exports; a clear error for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a pixeldit export (format={metadata.get('format')!r})")
    return metadata


def load_exported(path: str, weights: str = "ema", device="cpu") -> PixelDiT:
    """A PixelDiT with the exported `ema` (default) or `model` weights."""
    from safetensors import safe_open

    if weights not in ("ema", "model"):
        raise ConfigError(f"weights={weights!r}: expected 'ema' or 'model'")
    arch = PixelDiTArch(**json.loads(read_export_metadata(path)["arch"]))
    with safe_open(path, framework="pt", device=str(device)) as f:
        prefix = weights + "."
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    model = PixelDiT(arch).to(device)
    model.load_state_dict(state, strict=True)
    return model.eval()
