"""Import the authors' released PixelDiT weights (a PyTorch Lightning .ckpt).

Their state dict holds `denoiser.*` (trained weights), `ema_denoiser.*` (EMA)
and `diffusion_trainer.proj.0.{0,2,4}.*` (the REPA projector). Our module names
were chosen to match theirs inside a denoiser group, so the import is a strict
prefix strip plus a shape check against the architecture read off the weights.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from ..errors import MissingFileError, WeightsError
from .pixeldit import PixelDiT, PixelDiTArch

log = logging.getLogger(__name__)

GROUPS = {"model": "denoiser.", "ema": "ema_denoiser.", "projector": "diffusion_trainer.proj.0."}


def _group(state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def infer_arch(denoiser: dict[str, torch.Tensor]) -> PixelDiTArch:
    """Read the architecture off the tensor shapes of one denoiser group."""
    try:
        D, patch_in = denoiser["s_embedder.proj.weight"].shape
        head_dim = denoiser["patch_blocks.0.attn.q_norm.weight"].shape[0]
        num_classes = denoiser["y_embedder.embedding_table.weight"].shape[0] - 1
    except KeyError as e:
        raise WeightsError(f"not a PixelDiT denoiser state dict: missing {e.args[0]!r}") from None
    in_channels = 3
    patch_size = round((patch_in / in_channels) ** 0.5)
    patch_depth = 1 + max(int(k.split(".")[1]) for k in denoiser if k.startswith("patch_blocks."))
    pixel_keys = [k for k in denoiser if k.startswith("pixel_blocks.")]
    fields = dict(patch_depth=patch_depth, hidden_size=D, num_heads=D // head_dim, patch_size=patch_size,
                  in_channels=in_channels, num_classes=num_classes)
    if not pixel_keys:
        return PixelDiTArch(pixel_depth=0, variant="dit", **fields)
    d_pix = denoiser["pixel_embedder.proj.weight"].shape[0]
    mod_width = denoiser["pixel_blocks.0.adaLN_modulation.0.weight"].shape[0]
    p2 = patch_size * patch_size
    layouts = {6 * p2 * d_pix: ("pixel", False), 4 * p2 * d_pix: ("pixel", True),
               6 * d_pix: ("patch", False), 4 * d_pix: ("patch", True)}
    if mod_width not in layouts:
        raise WeightsError(f"pixel_blocks.0.adaLN_modulation.0.weight has {mod_width} rows; "
                         f"expected one of {sorted(layouts)} for p={patch_size}, D_pix={d_pix}")
    pixel_adaln, post = layouts[mod_width]
    return PixelDiTArch(pixel_depth=1 + max(int(k.split(".")[1]) for k in pixel_keys),
                        pixel_hidden_size=d_pix, pixel_adaln=pixel_adaln, post_modulation=post, **fields)


def _check_against(model_sd: dict, group: dict, what: str):
    missing = sorted(set(model_sd) - set(group))
    unexpected = sorted(set(group) - set(model_sd))
    if missing or unexpected:
        raise WeightsError(f"{what}: missing keys {missing[:10]}{'…' if len(missing) > 10 else ''}, "
                       f"unexpected keys {unexpected[:10]}{'…' if len(unexpected) > 10 else ''}")
    for k, ref in model_sd.items():
        if tuple(group[k].shape) != tuple(ref.shape):
            raise WeightsError(f"{what}: {k} has shape {tuple(group[k].shape)}, expected {tuple(ref.shape)}")


def import_authors_state_dict(state_dict: dict, arch: PixelDiTArch | None = None) -> dict:
    """Their state dict → {"arch", "model", "ema", "projector"} in our names.

    Strict: a key the model does not have, a key it lacks, or a wrong shape is
    an error naming the key. A group absent from the checkpoint (e.g. no EMA) is
    returned as None; a key outside the three groups is an error.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    stray = sorted(k for k in state_dict if not any(k.startswith(p) for p in GROUPS.values()))
    if stray:
        raise WeightsError(f"unexpected keys outside {list(GROUPS.values())}: {stray[:10]}")
    groups = {name: _group(state_dict, prefix) for name, prefix in GROUPS.items()}
    source = groups["ema"] or groups["model"]
    if not source:
        raise WeightsError("checkpoint has neither 'denoiser.' nor 'ema_denoiser.' weights")
    arch = arch or infer_arch(source)
    with torch.device("meta"):
        reference = PixelDiT(arch).state_dict()
    out: dict = {"arch": arch}
    for name in ("model", "ema"):
        if groups[name]:
            _check_against(reference, groups[name], f"{GROUPS[name]}*")
        out[name] = groups[name] or None
    proj = groups["projector"]
    if proj:
        expected = {f"{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")}
        if set(proj) != expected:
            raise WeightsError(f"diffusion_trainer.proj.0.*: missing keys {sorted(expected - set(proj))}, "
                           f"unexpected keys {sorted(set(proj) - expected)}")
        if proj["0.weight"].shape[1] != arch.hidden_size:
            raise WeightsError(f"diffusion_trainer.proj.0.0.weight takes {proj['0.weight'].shape[1]} inputs, "
                             f"the model's hidden size is {arch.hidden_size}")
    out["projector"] = proj or None
    return out


def load_authors_checkpoint(path: str | Path, arch: PixelDiTArch | None = None) -> dict:
    """Load their .ckpt from disk and import it (see import_authors_state_dict)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"authors' checkpoint not found: {path}")
    # torch.load's failures for a file that is not a checkpoint: a bad pickle, a bad zip, a short file
    not_a_checkpoint = (pickle.UnpicklingError, RuntimeError, EOFError)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # Lightning stores hyper-parameters as arbitrary objects
        log.warning("%s is not loadable with weights_only=True (%s); loading it as a trusted file", path, e)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except not_a_checkpoint as e2:
            raise WeightsError(f"{path}: not a PyTorch checkpoint ({type(e2).__name__}: {e2})") from None
    except not_a_checkpoint as e:
        raise WeightsError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    try:
        return import_authors_state_dict(raw, arch)
    except (KeyError, ValueError) as e:
        raise type(e)(f"{path}: {e.args[0]}") from None
