"""Parallelism and checkpointing, applied to the plain models from outside (docs/architecture.md).

  spec.py              ParallelSpec / OptimizerSpec: what this floor needs of the config
  train_module.py      TrainModule: the model and the REPA projector, what every strategy wraps
  wrap.py              where DDP, FSDP2 (fully_shard per block) and DeepSpeed are applied;
                       activation checkpointing, per-block compile
  optimizer.py         AdamW (ddp / fsdp) and DeepSpeed's config, one place each
  step.py              the step protocol: forward / backward / accumulating / begin_step / finish_step
  strategy.py          build_strategy: spec -> wrapped module + step + checkpoint state
  checkpoint_state.py  one adapter per strategy: the engine folder's save / load / readers, EMA fragments
  zero_universal.py    a ZeRO checkpoint loaded by another world size (DeepSpeed's universal format)
  checkpoint.py        where a checkpoint is written: step folders, meta.json, atomic `latest`, pruning
  ema.py               the sharded EMA of the fp32 master fragments
  torch_files.py       torch.save / DCP to a folder or an fsspec URL
  deepspeed_internals.py, torch_internals.py   every private-API reach, with its reason
"""

from .spec import STRATEGIES, OptimizerSpec, ParallelSpec
from .strategy import build_strategy
from .train_module import TrainModule

__all__ = ["STRATEGIES", "OptimizerSpec", "ParallelSpec", "TrainModule", "build_strategy"]
