"""EMA of the fp32 master weights, sharded like them, saved in one format for every strategy.

Each strategy hands over its rank's fp32 master *fragments*: for every named
parameter, a 1-D view of the flattened fp32 master covering [start, start + n)
of that parameter (the whole tensor under ddp, a row block under fsdp, a flat
partition under ZeRO). The EMA keeps one fp32 copy per fragment, so its memory
per rank follows the sharding (≈ 1/world), and it never reads bf16 copies: an
update of 1e-4 of a weight is below bf16's resolution.

On disk the EMA is a DCP checkpoint of 1-D ShardedTensors named after the
parameters; each rank contributes its fragments. It therefore consolidates and
reshards the same way whichever strategy or world size wrote it.

On a CPU whose step leaves a core free (fewer intra-op threads than cores, as under torchrun's
one thread per process), the update runs on a thread of its own while the trainer goes on with
the next step's inputs and forward: it is a memory-bound pass over every master (PixelDiT-B: 185M
fp32 values, 0.10-0.16 s on one core), as much as 6% of a bf16 step where it ran inline. Where
the step's threads take every core it stays inline: beside them it would only compete for the
same cores. The masters may be read meanwhile (the forward reads them too) but not written:
`settle()` waits for the update and must come before the optimizer changes them; anything that
reads `shadow` waits by itself. On a GPU the update is queued on the current stream and the host
does not wait for it anyway.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .torch_files import dcp_load, dcp_save
from .torch_internals import foreach_lerp_, shard, sharded_tensor


@dataclass
class Fragment:
    name: str
    shape: tuple[int, ...]   # the parameter's full shape
    start: int               # offset into the flattened parameter
    master: torch.Tensor     # 1-D fp32 view of the rank's master slice (live, updated by the optimizer)


class ShardedEMA:
    def __init__(self, fragments: list[Fragment], decay: float, warmup: bool = False, replicated: bool = False):
        self.fragments = fragments
        # replicated (ddp): every rank holds the same whole tensors; rank 0 alone writes them
        self.replicated = replicated
        self.decay, self.warmup = decay, warmup
        self._shadow = [f.master.detach().float().clone() for f in fragments]
        self.updates = 0
        self._pending: Future | None = None
        self._worker: ThreadPoolExecutor | None = None  # started with the first update on a CPU

    @property
    def shadow(self) -> list[torch.Tensor]:
        """The EMA tensors, with any update in flight finished."""
        self.settle()
        return self._shadow

    def settle(self):
        """Wait for the update in flight (and raise what it raised): before the masters change."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def decay_at(self, updates: int) -> float:
        """With warm-up, min(decay, (1 + n) / (10 + n)): an EMA that can leave its init in a short run."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + updates) / (10 + updates))

    def update(self):
        """Move the EMA towards the masters as they are now; on a CPU with a free core, returns before it is done."""
        self.settle()
        weight = 1.0 - self.decay_at(self.updates)
        self.updates += 1
        if not self._shadow:
            return
        masters = [f.master.detach().float() for f in self.fragments]
        if self._shadow[0].device.type != "cpu" or not a_core_is_free():
            _lerp(self._shadow, masters, weight)
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="pixeldit-ema")
        self._pending = self._worker.submit(_lerp, self._shadow, masters, weight)

    def local_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._shadow)

    # ---------------------------------------------------------------- persistence

    def sharded_state(self, rank: int) -> dict:
        """{name: 1-D ShardedTensor} for DCP; ranks that hold no slice of a name contribute nothing."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            # one process holds every parameter whole: plain flat tensors, same names and layout
            return {f.name: shadow for f, shadow in zip(self.fragments, self.shadow)}
        by_name: dict[str, list] = {}
        sizes: dict[str, int] = {}
        for fragment, shadow in zip(self.fragments, self.shadow):
            sizes[fragment.name] = _numel(fragment.shape)
            if shadow.numel() and (rank == 0 or not self.replicated):
                piece = shard(shadow, fragment.start, f"rank:{rank}/{shadow.device}")
                by_name.setdefault(fragment.name, []).append(piece)
        return {name: sharded_tensor(by_name.get(name, []), [size])
                for name, size in sorted(sizes.items())}

    def save(self, path: str, rank: int):
        """`path`: a folder or an fsspec URL (DCP's fsspec writer)."""
        dcp_save(self.sharded_state(rank), path)

    def load(self, path: str, rank: int):
        """Read this rank's slices from an EMA checkpoint written by any strategy and world size."""
        if self.replicated:  # every rank reads every tensor whole
            dcp_load({f.name: shadow for f, shadow in zip(self.fragments, self.shadow)}, path)
        else:
            dcp_load(self.sharded_state(rank), path)  # the shards are views of self.shadow


def a_core_is_free() -> bool:
    """Whether this process's intra-op threads leave one of the cores it may run on idle."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() < cores


@torch.no_grad()  # grad mode is per thread: the worker's needs setting there
def _lerp(shadow: list[torch.Tensor], masters: list[torch.Tensor], weight: float):
    foreach_lerp_(shadow, masters, weight)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_full_ema(path: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Consolidate an EMA checkpoint in one process: {name: full fp32 tensor of `shapes[name]`}."""
    flat = {name: torch.empty(_numel(shape), dtype=torch.float32) for name, shape in shapes.items()}
    dcp_load(flat, path)
    return {name: t.view(shapes[name]) for name, t in flat.items()}
