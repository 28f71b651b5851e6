"""How one global batch is spread over the ranks: the one place that decides it.

The recipe fixes `train.global_batch` (256 in the paper); `train.micro_batch` is a memory
choice, the most samples one rank pushes through the model at once (`auto`: at most
AUTO_MICRO_BATCH). The accumulation follows from the world size, so the same config runs on
1, 8, 16, 32 or 64 GPUs with the same global batch. The per-sample draws come from (seed,
step, sample index), so the layout changes neither the samples of a step nor their noise.

The trainer, the strategies (DeepSpeed's batch settings), the loader and `pixeldit launch`
all take their numbers from `batch_layout`; a layout that cannot work is refused here, with
what would work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import LaunchError

log = logging.getLogger(__name__)

# `train.micro_batch: auto` takes the largest divisor of the per-rank batch up to this. 32 is
# the paper's per-GPU batch at 256 px (256 = 32 x 8 GPUs); a GPU that runs out of memory there
# sets a smaller maximum (or activation checkpointing), the global batch stays the recipe's.
AUTO_MICRO_BATCH = 32


@dataclass(frozen=True)
class BatchLayout:
    world: int          # ranks (processes, one per GPU)
    per_rank: int       # samples each rank contributes to one step
    micro_batch: int    # samples per forward / backward on a rank
    accumulation: int   # micro-batches per rank per step

    @property
    def global_batch(self) -> int:
        return self.world * self.per_rank

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world} rank{'s' if self.world > 1 else ''} x "
                f"{self.per_rank} = {self.world} x {self.accumulation} micro-batch"
                f"{'es' if self.accumulation > 1 else ''} of {self.micro_batch}")


def micro_batch_limit(micro_batch: int | str) -> int:
    return AUTO_MICRO_BATCH if micro_batch == "auto" else int(micro_batch)


def batch_layout(global_batch: int, micro_batch: int | str, world: int,
                 per_node: int | None = None) -> BatchLayout:
    """The layout of `global_batch` over `world` ranks with micro-batches of at most `micro_batch`.

    Any global batch that the ranks divide evenly works: the micro-batch is the largest divisor
    of the per-rank batch within the limit (equal micro-batches: DeepSpeed requires
    micro x accumulation x world = global). `per_node` (a launch) phrases the fix in nodes.
    """
    if global_batch % world:
        raise LaunchError(_refusal(global_batch, world, per_node))
    per_rank = global_batch // world
    limit = micro_batch_limit(micro_batch)
    micro = _micro(per_rank, limit)
    if micro < limit / 2 and micro < per_rank:
        _warn_small_micro_batch(global_batch, world, per_rank, micro, limit)
    return BatchLayout(world=world, per_rank=per_rank, micro_batch=micro, accumulation=per_rank // micro)


def _micro(per_rank: int, limit: int) -> int:
    """The largest divisor of the per-rank batch within the limit (equal micro-batches)."""
    return max(d for d in range(1, min(limit, per_rank) + 1) if per_rank % d == 0)


_warned: set[tuple[int, int, int]] = set()


def _warn_small_micro_batch(global_batch: int, world: int, per_rank: int, micro: int, limit: int):
    """Once per process and layout (the trainer, the strategy and the loader each ask): a per-rank batch
    with no divisor near the limit (a prime, say) runs many small micro-batches, slow but correct. The
    words are the same on every rank; the nearest global batch with micro-batches of at least half the
    limit is named."""
    if (global_batch, world, limit) in _warned:
        return
    _warned.add((global_batch, world, limit))
    better = min((p for p in range(1, 2 * per_rank + limit) if _micro(p, limit) >= limit / 2),
                 key=lambda p: (abs(p - per_rank), -p))
    log.warning("train.global_batch=%d over %d rank(s) is %d per rank, whose largest divisor within the micro "
                "batch limit of %d (train.micro_batch) is %d: %d micro-batches of %d per step, slower than need "
                "be; train.global_batch=%d would run micro-batches of %d", global_batch, world, per_rank, limit,
                micro, per_rank // micro, micro, better * world, _micro(better, limit))


def _refusal(global_batch: int, world: int, per_node: int | None) -> str:
    nodes = world // per_node if per_node and world % per_node == 0 else 1
    where = f" ({nodes} nodes x {per_node} processes)" if nodes > 1 else ""
    options = []
    if nodes > 1:
        counts = [n for n in range(1, global_batch // per_node + 1) if global_batch % (n * per_node) == 0]
        near = _nearest(counts, nodes)
        if near:
            options.append(f"{' or '.join(map(str, near))} nodes of {per_node}")
    if not options:
        near = _nearest([n for n in range(1, global_batch + 1) if global_batch % n == 0], world)
        options.append(f"{' or '.join(map(str, near))} ranks")
    options.append(f"set train.global_batch={-(-global_batch // world) * world}")
    return (f"train.global_batch={global_batch} over {world} ranks{where}: the ranks must share it evenly; "
            f"use {', or '.join(options)}")


def _nearest(counts: list[int], current: int) -> list[int]:
    """The closest working counts below and above `current`."""
    below = [n for n in counts if n < current]
    above = [n for n in counts if n > current]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])
