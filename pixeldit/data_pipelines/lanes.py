"""A rank's samples in batch-sized groups, lane by lane: what both decoders consume.

`LoaderSpec` is everything a lane needs to rebuild itself (small and picklable). The groups are
the undecoded samples of one batch each, with the read statistics gathered while reading them;
the decoders (loader.py, dali.py) turn them into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .features import FeatureManifest, LockstepReader
from .manifest import Manifest
from .source import EpochPlan, RawSample, ReadStats, ShardReader, Split, interleave, iter_lane, lane_position

Group = tuple[list[RawSample], ReadStats]


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a worker needs to rebuild its lane (picklable, small)."""
    manifest: Manifest
    root: str
    image_size: int
    batch: int
    seed: int
    split: Split
    window: int
    hflip: bool
    options: dict | None
    features: FeatureManifest | None = None   # REPA feature shards read in lockstep, when cached
    features_root: str | None = None

    def needs_resize(self) -> bool:
        policy = self.manifest.image
        return not (policy.mode == "adm" and policy.size == self.image_size)

    def batches_per_rank(self, epoch: int) -> int:
        return EpochPlan(self.manifest, self.seed, epoch, self.split).batches_per_rank


def batched(items: Iterator, size: int) -> Iterator[list]:
    """Lists of `size` items; the last one may be shorter."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def lane_groups(spec: LoaderSpec, epoch: int, lane: int, start_batch: int) -> Iterator[Group]:
    """The lane's batches from its batch `start_batch` on, undecoded, each with its read statistics."""
    plan = EpochPlan(spec.manifest, spec.seed, epoch, spec.split)
    reader = ShardReader(spec.manifest, spec.root, spec.options)
    if spec.features is not None:
        reader = LockstepReader(reader, ShardReader(spec.features, spec.features_root, spec.options))
    samples = iter_lane(plan, reader, lane, spec.window, start_batch * spec.batch)
    for group in batched(samples, spec.batch):
        if len(group) != spec.batch:
            raise AssertionError("lanes are batch-aligned; a partial batch means a planning bug")
        stats, reader.stats = reader.stats, ReadStats()
        yield group, stats


def every_lane(spec: LoaderSpec, epoch: int, batches_done: int) -> list[Iterator[Group]]:
    """One iterator per lane, each at its position after the rank's first `batches_done` batches."""
    lanes = spec.split.lanes
    return [lane_groups(spec, epoch, lane, lane_position(batches_done, lanes, lane)) for lane in range(lanes)]


def rank_groups(spec: LoaderSpec, epoch: int, batches_done: int) -> Iterator[Group]:
    """The rank's batches after its first `batches_done`, undecoded, in the rank's order (lane by lane)."""
    return interleave(every_lane(spec, epoch, batches_done), start=batches_done % spec.split.lanes)
