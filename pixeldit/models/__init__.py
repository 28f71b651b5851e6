"""Plain nn.Modules: no distributed, DeepSpeed or data code may be imported here."""

from .checkpoint_import import import_authors_state_dict, infer_arch, load_authors_checkpoint
from .flops import forward_flops, training_flops
from .pixeldit import PRESETS, PixelDiT, PixelDiTArch, build_model, resolve_arch
from .projector import build_projector

__all__ = [
    "PRESETS", "PixelDiT", "PixelDiTArch", "build_model", "resolve_arch", "build_projector",
    "forward_flops", "training_flops", "import_authors_state_dict", "infer_arch", "load_authors_checkpoint",
]
