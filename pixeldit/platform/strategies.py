"""One switch, `distributed.strategy`: ddp | fsdp | zero1 | zero2 | zero3.

Every strategy wraps the same plain TrainModule (model + REPA projector) from
outside and offers the same step protocol to the trainer:

    strategy.begin_step(lr, clip)
    for each micro-batch:  with strategy.accumulating(last): loss = ...; strategy.backward(loss)
    grad_norm, stepped = strategy.finish_step(skip)

plus `fragments()` (the rank's fp32 master slices, for the EMA), `save/load`
(the native sharded format: torch.save, DCP, DeepSpeed; to a folder or an fsspec
URL) and `full_state_dict()`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from ..distributed import world
from ..errors import CheckpointNotFound, ConfigError
from .checkpoint import (dcp_load, dcp_save, exists, join, load_torch, local_folder, read_text, remove,
                         save_torch, write_text)
from .ema import Fragment

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
UNIVERSAL = "universal"       # engine/universal/: a ZeRO checkpoint converted for another world size
CONVERTED = "converted.json"  # written last into it: a folder without it is a crashed conversion
CONVERSION_FAILED = "failed.txt"
UNIVERSAL_WAIT_S = 6 * 3600


class TrainModule(nn.Module):
    """What the strategies wrap: the model and, with REPA, the projector trained beside it."""

    def __init__(self, model: nn.Module, projector: nn.Module | None = None, repa_block: int | None = None):
        super().__init__()
        self.model = model
        self.projector = projector
        self.repa_block = repa_block

    def forward(self, x_t, t, y):
        if self.projector is None:
            return self.model(x_t, t, y), None
        v, hidden = self.model.forward_with_hidden(x_t, t, y, self.repa_block)
        return v, self.projector(hidden)


def _adamw(params, optim_cfg, lr: float):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, foreach=True)


def _finite(value: float) -> bool:
    return math.isfinite(value)


class Strategy:
    name = "base"

    def __init__(self, module: TrainModule, cfg, device: torch.device):
        self.module, self.cfg, self.device = module, cfg, device
        self.rank, self.world = world()
        self.bf16 = cfg.distributed.precision == "bf16"
        self.layout = cfg.train.layout(self.world)

    # ---- forward / backward
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def forward(self, x_t, t, y):
        with self.autocast():
            return self.wrapped(x_t, t, y)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def begin_step(self, lr: float, clip: float):
        self.lr, self.clip = lr, clip

    def finish_step(self, skip: bool) -> tuple[float, bool]:
        """Clip, check, step. A non-finite norm (global, so every rank agrees) skips the step."""
        norm = self._clip(self.clip)
        if skip or not _finite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm, False
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, True

    def _clip(self, clip: float) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)



class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, module, cfg, device):
        super().__init__(module, cfg, device)
        self.module = module.to(device)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.wrapped = DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda"
                                                   else None, broadcast_buffers=False)
        else:
            self.wrapped = self.module
        self.optimizer = _adamw(self.module.parameters(), cfg.optim, cfg.schedule.stages[0].lr)

    def accumulating(self, last: bool):
        if self.world > 1 and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def fragments(self) -> list[Fragment]:
        return [Fragment(n, tuple(p.shape), 0, p.data.view(-1)) for n, p in self.module.named_parameters()]

    def save(self, path: str):
        if self.rank == 0:
            save_torch({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       join(path, "state.pt"))

    def load(self, path: str, saved_world: int | None = None):
        state = load_torch(join(path, "state.pt"), map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}


class FSDPStrategy(Strategy):
    """FSDP2: fully_shard per block and at the root; bf16 compute, fp32 reduce, fp32 sharded masters."""

    name = "fsdp"

    def __init__(self, module, cfg, device):
        super().__init__(module, cfg, device)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 \
            else MixedPrecisionPolicy()
        module.to(device)
        for block in [*module.model.patch_blocks, *module.model.pixel_blocks]:
            fully_shard(block, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        self.module = self.wrapped = module
        self.optimizer = _adamw(module.parameters(), cfg.optim, cfg.schedule.stages[0].lr)

    def forward(self, x_t, t, y):
        # FSDP2 casts parameters itself; the inputs follow its param dtype
        dtype = torch.bfloat16 if self.bf16 else x_t.dtype
        return self.wrapped(x_t.to(dtype), t, y)

    def accumulating(self, last: bool):
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def fragments(self) -> list[Fragment]:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        out = []
        for name, p in self.module.named_parameters():
            local = p.to_local()
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            out.append(Fragment(name, tuple(p.shape), offset[0] * row if local.numel() else 0, local.view(-1)))
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


class ZeroStrategy(Strategy):
    """DeepSpeed ZeRO 1/2/3 with our optimizer settings; the staged lr and clip are pushed in each step."""

    def __init__(self, module, cfg, device, stage: int):
        super().__init__(module, cfg, device)
        import deepspeed

        self.name, self.stage = f"zero{stage}", stage
        optim = cfg.optim
        ds_config = {
            "train_batch_size": cfg.train.global_batch,
            "train_micro_batch_size_per_gpu": self.layout.micro_batch,
            "gradient_accumulation_steps": self.layout.accumulation,
            "gradient_clipping": cfg.schedule.stages[0].clip,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": self.bf16},
            "optimizer": {"type": "AdamW", "params": {
                "lr": cfg.schedule.stages[0].lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
                "torch_adam": True, "adam_w_mode": True}},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                                                 config=ds_config)
        self.module, self.wrapped = self.engine.module, self.engine
        self._skipped = self.engine.skipped_steps

    def forward(self, x_t, t, y):
        # DeepSpeed holds bf16 weights without autocast: inputs must match them
        return self.engine(x_t.to(torch.bfloat16) if self.bf16 else x_t, t, y)

    def backward(self, loss):
        self.engine.backward(loss)
        self.engine.step()  # a no-op for the optimizer until the accumulation boundary

    def begin_step(self, lr: float, clip: float):
        super().begin_step(lr, clip)
        # DeepSpeed reads gradient_clipping once at start: push the stage's clip where it is used
        self.engine._config.gradient_clipping = clip
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = clip
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def finish_step(self, skip: bool) -> tuple[float, bool]:
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = self.engine.skipped_steps != self._skipped
        self._skipped = self.engine.skipped_steps
        return norm, not skipped and not skip

    def fragments(self) -> list[Fragment]:
        out = []
        for name, p in self.module.named_parameters():
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            if self.stage == 3:
                part = p._z3_optimizer.get_local_fp32_param(p)
                start = self.rank * p.ds_tensor.ds_numel
                n = max(0, min(math.prod(shape) - start, part.numel()))
                out.append(Fragment(name, shape, start if n else 0, part[:n]))
            elif p._hp_mapping is None:
                out.append(Fragment(name, shape, 0, torch.empty(0)))
            else:
                address = p._hp_mapping.lp_fragment_address
                out.append(Fragment(name, shape, address.start, p._hp_mapping.get_hp_fragment().view(-1)))
        return out

    def save(self, path: str):
        # DeepSpeed writes local files only: on object storage each rank stages its own files, then uploads.
        # Client state is ours (rank files); DeepSpeed's own `latest` file is not used
        with local_folder(path, upload=True) as local:
            self.engine.save_checkpoint(local, tag="engine", client_state={}, save_latest=False)

    def load(self, path: str, saved_world: int | None = None):
        """Same world: DeepSpeed's own files. Another world: its universal checkpoint, converted once."""
        tag = "engine" if saved_world in (None, self.world) else self._universal(path, saved_world)
        with local_folder(join(path, tag), download=True) as local:
            # the flag is read inside load_checkpoint only; off again after, so a later load is native
            self.engine._config.load_universal_checkpoint = tag == UNIVERSAL
            try:
                load_path, _ = self.engine.load_checkpoint(os.path.dirname(local), tag=tag, load_module_strict=True,
                                                           load_optimizer_states=True, load_lr_scheduler_states=False)
            finally:
                self.engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise CheckpointNotFound(f"no DeepSpeed checkpoint under {join(path, tag)}")
        self._skipped = self.engine.skipped_steps

    def _universal(self, path: str, saved_world: int) -> str:
        """Convert `path/engine` (ZeRO partitions of `saved_world` ranks) into DeepSpeed's universal
        layout `path/universal` (one file per parameter and state) on rank 0, once per checkpoint."""
        target = join(path, UNIVERSAL)
        done, failed = join(target, CONVERTED), join(target, CONVERSION_FAILED)
        needed = [self.rank == 0 and not exists(done)]
        if dist.is_initialized():
            dist.broadcast_object_list(needed, src=0)
        if not needed[0]:
            return UNIVERSAL
        if self.rank == 0:
            remove(target)  # a conversion that crashed midway, or an old failure marker
        if dist.is_initialized():
            dist.barrier()
        where = f"{join(path, 'engine')}: converting a checkpoint of {saved_world} ranks to DeepSpeed's universal " \
                f"format for {self.world}"
        if self.rank == 0:
            try:
                from deepspeed.checkpoint import ds_to_universal
                with local_folder(join(path, "engine"), download=True) as source, \
                        local_folder(target, upload=True) as out:
                    # one worker: the pool forks this process, process group and all
                    args = argparse.Namespace(input_folder=source, output_folder=out, num_extract_workers=1,
                                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                                              inject_missing_state=True)
                    ds_to_universal.main(args)
                write_text(done, json.dumps({"from_world": saved_world}))  # last: the commit
            except Exception as e:
                write_text(failed, f"{type(e).__name__}: {e}")
                raise RuntimeError(f"{where} failed: {type(e).__name__}: {e}") from e
            return UNIVERSAL
        # the other ranks poll the markers instead of waiting in a collective: converting XL's optimizer
        # state on shared or object storage can outlast distributed.timeout_s and the NCCL watchdog
        deadline = time.monotonic() + UNIVERSAL_WAIT_S
        while not exists(done):
            if exists(failed):
                raise RuntimeError(f"{where} failed on rank 0: {read_text(failed)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{where}: rank 0 did not finish within {UNIVERSAL_WAIT_S} s")
            time.sleep(2.0)
        return UNIVERSAL

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param
        return {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in self.module.named_parameters()}


def apply_activation_checkpointing(model: nn.Module, mode: str):
    """Recompute block activations in backward, without renaming any parameter.

    The block's forward is replaced in place (no wrapper module), so checkpoint
    keys, EMA names and FSDP2's per-block sharding stay exactly as without AC.
    """
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint

    blocks = [*model.patch_blocks, *model.pixel_blocks]
    for i, block in enumerate(blocks):
        if mode == "selective" and i % 2:
            continue
        inner = block.forward
        block.forward = lambda *args, _inner=inner: checkpoint(_inner, *args, use_reentrant=False)


def compile_blocks(model: nn.Module):
    for block in [*model.patch_blocks, *model.pixel_blocks]:
        block.compile()


def build_strategy(module: TrainModule, cfg, device: torch.device) -> Strategy:
    apply_activation_checkpointing(module.model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(module.model)
    name = cfg.distributed.strategy
    if name == "ddp":
        return DDPStrategy(module, cfg, device)
    if name == "fsdp":
        return FSDPStrategy(module, cfg, device)
    if name in ("zero1", "zero2", "zero3"):
        return ZeroStrategy(module, cfg, device, int(name[-1]))
    raise ConfigError(f"distributed.strategy={name!r}: expected one of {STRATEGIES}")
