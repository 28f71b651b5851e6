"""One checkpoint-state adapter per strategy: what the engine folder of a checkpoint holds and how it
is written, read back (into any world size) and consolidated.

Each adapter offers, for a live run: `save(path)` / `load(path, saved_world)` (collective), `fragments()`
(the rank's fp32 master slices, for the EMA) and `full_state_dict()`; and, for a process that holds no
engine (`pixeldit export`, sampling from a checkpoint), `read_weights(path, template)`: the full fp32
weights of the engine folder at `path`.

On disk, `<step>/engine/` is:
  ddp    state.pt: {"module", "optimizer"} by torch.save, written by rank 0
  fsdp   a DCP checkpoint of {"module", "optimizer"} (get_state_dict), resharded by DCP on load
  zeroN  DeepSpeed's own files under the tag `engine/`; after a world-size change also
         `universal/`, DeepSpeed's universal layout converted from them (zero_universal.py)
"""

from __future__ import annotations

import math
import os

import torch

from .. import storage
from ..errors import CheckpointNotFound
from .deepspeed_internals import universal_checkpoint_loading, zero3_partition_numel, zero12_fragment
from .ema import Fragment
from .torch_files import dcp_load, dcp_save, load_torch, save_torch
from .torch_internals import dtensor_global_offset
from .zero_universal import NATIVE, UNIVERSAL, universal_tag


class DDPCheckpoint:
    FILE = "state.pt"
    replicated = True  # every rank holds the whole module: rank 0 alone writes it, and the EMA

    def __init__(self, module, optimizer, device: torch.device, rank: int):
        self.module, self.optimizer, self.device, self.rank = module, optimizer, device, rank

    def fragments(self) -> list[Fragment]:
        return [Fragment(n, tuple(p.shape), 0, p.data.view(-1)) for n, p in self.module.named_parameters()]

    def save(self, path: str):
        if self.rank == 0:
            save_torch({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       storage.path_join(path, self.FILE))

    def load(self, path: str, saved_world: int | None = None):
        state = load_torch(storage.path_join(path, self.FILE), map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}

    @classmethod
    def read_weights(cls, path: str, template: dict) -> dict[str, torch.Tensor]:
        return load_torch(storage.path_join(path, cls.FILE), map_location="cpu", weights_only=True)["module"]


class FSDPCheckpoint:
    replicated = False

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer

    def fragments(self) -> list[Fragment]:
        """FSDP2 shards dim 0: a rank's slice is a row block, contiguous in the flattened parameter."""
        out = []
        for name, p in self.module.named_parameters():
            local = p.to_local()
            row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            start = dtensor_global_offset(p)[0] * row if local.numel() else 0
            out.append(Fragment(name, tuple(p.shape), start, local.view(-1)))
        return out

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"module": model_state, "optimizer": optim_state}

    def save(self, path: str):
        dcp_save(self._state(), path)

    def load(self, path: str, saved_world: int | None = None):
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self._state()
        dcp_load(state, path)  # DCP reshards to this world by itself
        set_state_dict(self.module, self.optimizer, model_state_dict=state["module"],
                       optim_state_dict=state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() for k, v in state.items()}

    @classmethod
    def read_weights(cls, path: str, template: dict) -> dict[str, torch.Tensor]:
        state = {"module": {k: torch.empty(v.shape, dtype=torch.float32) for k, v in template.items()}}
        dcp_load(state, path)
        return state["module"]


class ZeroCheckpoint:
    """DeepSpeed writes and reads local files only: on object storage each rank stages its own files
    in a temporary folder, then uploads (or downloads first). DeepSpeed's own `latest` file is not
    used (the checkpoint folder has its own), nor its client state (the rank files hold ours)."""

    replicated = False

    def __init__(self, engine, stage: int, rank: int, world: int):
        self.engine, self.stage, self.rank, self.world = engine, stage, rank, world
        self.module = engine.module

    def fragments(self) -> list[Fragment]:
        from deepspeed.utils import safe_get_local_fp32_param

        out = []
        for name, p in self.module.named_parameters():
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            if self.stage == 3:
                part = safe_get_local_fp32_param(p)
                start = self.rank * zero3_partition_numel(p)
                n = max(0, min(math.prod(shape) - start, part.numel()))  # the last rank's partition is padded
                out.append(Fragment(name, shape, start if n else 0, part[:n]))
                continue
            held = zero12_fragment(p)
            start, master = held if held is not None else (0, torch.empty(0))
            out.append(Fragment(name, shape, start, master))
        return out

    def save(self, path: str):
        with storage.local_folder(path, upload=True) as local:
            self.engine.save_checkpoint(local, tag=NATIVE, client_state={}, save_latest=False)

    def load(self, path: str, saved_world: int | None = None):
        """Same world: DeepSpeed's own files. Another world: its universal checkpoint, converted once."""
        same = saved_world in (None, self.world)
        tag = NATIVE if same else universal_tag(path, saved_world, self.rank, self.world)
        with storage.local_folder(storage.path_join(path, tag), download=True) as local, \
                universal_checkpoint_loading(self.engine, tag == UNIVERSAL):
            load_path, _ = self.engine.load_checkpoint(os.path.dirname(local), tag=tag, load_module_strict=True,
                                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointNotFound(f"no DeepSpeed checkpoint under {storage.path_join(path, tag)}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param
        return {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in self.module.named_parameters()}

    @classmethod
    def read_weights(cls, path: str, template: dict) -> dict[str, torch.Tensor]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with storage.local_folder(path, download=True) as local:
            return get_fp32_state_dict_from_zero_checkpoint(local, tag=NATIVE)


def read_trained_weights(strategy: str, path: str, template: dict) -> dict[str, torch.Tensor]:
    """The full fp32 weights of the engine folder `path` that `strategy` wrote, in this process."""
    adapter = {"ddp": DDPCheckpoint, "fsdp": FSDPCheckpoint}.get(strategy, ZeroCheckpoint)
    return adapter.read_weights(path, template)
