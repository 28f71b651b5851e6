"""The one sample source behind both decoders: plan, split, order, stream, retry, resume.

An epoch's order is a pure function of (seed, epoch, world size, rank, lanes,
batch size) and the manifest's sample counts:

1. Samples have canonical indices 0..N−1 (shard order of the manifest). An
   epoch keeps ⌊N / (world·B)⌋·world·B of them; the R dropped ones are a
   cyclic window starting at (epoch·R) mod N, so the remainder rotates and
   every sample is used over N/R epochs.
2. Shards are permuted by (seed, epoch); the kept samples in that shard order
   form the epoch sequence; rank r takes the r-th contiguous block, so ranks
   read disjoint byte ranges and yield the same number of batches.
3. A rank's batches are split into `lanes` contiguous runs, each read in
   order; lane l's k-th batch is the rank's batch k·lanes + l (round robin).
   Contiguous runs keep reads sequential inside shards; a lane is never
   handed a shard it cannot fill.
4. Inside a lane, windows of `shuffle_window` samples (the first three ramp
   up from 1/8 of it) are permuted by (seed, epoch, rank, lane, window).
   Resuming re-reads (without decoding) at most one window per lane.

Streams go through fsspec; a transient failure (5xx, throttling, reset, a body
cut short) reopens the shard at the first sample not yet delivered, from the
DALI index offsets, so nothing is duplicated or lost; the reopens back off
exponentially with jitter until `data.io_timeout_s`. Any other failure (a
missing shard, a 403, a deadline passed) stops the epoch with one line naming
the URL: the reader never skips what it could not read.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..diffusion.randomness import stream_seed
from ..errors import ConfigError
from .manifest import Manifest, shard_root, shard_url
from ..storage import (STORAGE_EXCEPTIONS, CorruptContent, MappedFile, RangedFile, Retrying, client_retries,
                      filesystem, io_timeout, is_local, join, read_bytes, strip_protocol)
from .tario import (
    CorruptHeader,
    DamagedSample,
    ShardIndex,
    TruncatedSample,
    intact_samples,
    iter_members,
    parse_index,
    read_exact,
    read_sample,
    slice_sample,
)

log = logging.getLogger(__name__)
CHUNK_BYTES = 4 << 20


# why a sample was skipped: corrupt content, never an access failure (docs/data.md, "Faults")
SKIP_REASONS = ("undecodable", "no_image", "bad_label", "label_out_of_range", "truncated", "corrupt_header")


@dataclass
class SkippedSample:
    """One sample left out of a batch, for `<run_dir>/skipped.jsonl`."""
    shard: str
    key: str
    reason: str       # one of SKIP_REASONS
    detail: str


@dataclass
class ReadStats:
    """Counts that travel with every batch so the main process can log them."""
    retries: int = 0
    skipped: dict[str, int] = field(default_factory=dict)   # samples left out of batches, by reason
    # the batch's skipped samples, by name; written to skipped.jsonl, never kept in a loader state
    records: list[SkippedSample] = field(default_factory=list, repr=False)

    def skip(self, reason: str, shard: str, key: str | None, detail: str):
        if reason not in SKIP_REASONS:
            raise AssertionError(f"unknown skip reason {reason!r}")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.records.append(SkippedSample(shard, key, reason, detail))

    def add(self, other: "ReadStats"):
        self.retries += other.retries
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.records.extend(other.records)

    def as_dict(self) -> dict:
        return {"retries": self.retries, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, state: dict) -> "ReadStats":
        """A loader state's counts. States written before the skip reasons counted undecodable images
        as `corrupt` and carry an `unreadable` that is now always 0 (shards are never skipped)."""
        skipped = state.get("skipped")
        if skipped is None:
            skipped = {"undecodable": state["corrupt"]} if state.get("corrupt") else {}
        return cls(state.get("retries", 0), dict(skipped))

    def scalars(self) -> dict[str, int]:
        """What the monitor logs to TensorBoard, by tag (every reason, so a curve starts at 0)."""
        return {"data/retries": self.retries,
                **{f"data/skipped/{reason}": self.skipped.get(reason, 0) for reason in SKIP_REASONS}}


@dataclass(frozen=True)
class Split:
    world: int
    rank: int
    lanes: int
    batch: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")
        if self.lanes < 1 or self.batch < 1:
            raise ValueError(f"lanes={self.lanes} and batch={self.batch} must be positive")


def lane_sizes(batches: int, lanes: int) -> list[int]:
    """Batches per lane: as equal as possible, the first lanes take the extra ones."""
    return [batches // lanes + (1 if lane < batches % lanes else 0) for lane in range(lanes)]


def lane_position(batches_done: int, lanes: int, lane: int) -> int:
    """How many of the first `batches_done` rank batches came from `lane` (round-robin order)."""
    return batches_done // lanes + (1 if lane < batches_done % lanes else 0)


def interleave(lane_iters: list[Iterator], start: int = 0) -> Iterator:
    """Round robin: one item from each live lane in turn, starting at lane `start`."""
    live = list(range(len(lane_iters)))
    live = live[start:] + live[:start]
    while live:
        for lane in list(live):
            try:
                yield next(lane_iters[lane])
            except StopIteration:
                live.remove(lane)


@dataclass
class EpochPlan:
    manifest: Manifest
    seed: int
    epoch: int
    split: Split
    shard_offsets: np.ndarray = field(init=False)

    def __post_init__(self):
        counts = np.array([s.samples for s in self.manifest.shards], dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(self.shard_offsets[-1])
        group = self.split.world * self.split.batch
        self.kept = total // group * group
        if self.kept == 0:
            raise ConfigError(f"train.global_batch: the data's {total} samples cannot fill one global batch of "
                              f"{group} ({self.split.world} ranks x {self.split.batch}); lower train.global_batch "
                              f"or use more data")
        self.num_samples = total
        self.batches_per_rank = self.kept // group

    def dropped(self) -> np.ndarray:
        """Canonical indices left out of this epoch (a window that rotates with the epoch)."""
        r = self.num_samples - self.kept
        start = (self.epoch * r) % self.num_samples
        return (start + np.arange(r)) % self.num_samples

    def sequence(self) -> np.ndarray:
        """The epoch's kept canonical indices, in permuted shard order."""
        rng = np.random.default_rng(stream_seed(self.seed, 11, self.epoch))
        order = rng.permutation(len(self.manifest.shards))
        seq = np.concatenate([np.arange(self.shard_offsets[s], self.shard_offsets[s + 1]) for s in order])
        keep = np.ones(self.num_samples, dtype=bool)
        keep[self.dropped()] = False
        return seq[keep[seq]]

    def lane_sequence(self, lane: int) -> np.ndarray:
        """Canonical indices of one lane, shuffled inside windows, batch-aligned."""
        split = self.split
        per_rank = self.batches_per_rank * split.batch
        rank_seq = self.sequence()[split.rank * per_rank:(split.rank + 1) * per_rank]
        sizes = lane_sizes(self.batches_per_rank, split.lanes)
        start = sum(sizes[:lane]) * split.batch
        return rank_seq[start:start + sizes[lane] * split.batch]

    def locate(self, canonical: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.shard_offsets, canonical, side="right") - 1)
        return shard, int(canonical - self.shard_offsets[shard])


def window_bounds(length: int, window: int) -> list[tuple[int, int]]:
    """(start, stop) of a lane's shuffle windows. The first ones ramp up from window/8, doubling
    (64, 128, 256, then 512 each at 512), like webdataset's `initial`: a lane yields its first
    batch after reading a small window, not a full one, at the start of every epoch."""
    bounds, start, size = [], 0, max(1, window // 8)
    while start < length:
        bounds.append((start, min(start + size, length)))
        start, size = bounds[-1][1], min(2 * size, window)
    return bounds


def window_order(seed: int, epoch: int, split: Split, lane: int, window: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(stream_seed(seed, 12, epoch, split.world, split.rank, lane, window))
    return rng.permutation(size)


class ShardReader:
    """Reads runs of consecutive samples of one shard set, reopening on transient failures.

    `stats.retries` counts every retry made for this reader: its own reopens and index reads,
    and the S3 client's retries of requests (taken from the filesystem's counter as it reads).
    """

    def __init__(self, manifest: Manifest, root: str, options: dict | None = None):
        self.manifest, self.root, self.options = manifest, shard_root(root), options
        self.stats = ReadStats()
        self._index: dict[int, ShardIndex] = {}

    def url(self, shard: int) -> str:
        return shard_url(self.manifest, self.root, self.manifest.shards[shard].name)

    def index(self, shard: int) -> ShardIndex:
        if shard not in self._index:
            url = join(self.root, self.manifest.shards[shard].index)
            entries = parse_index(read_bytes(url, self.options, on_retry=self._count_retry).decode(), url)
            if len(entries) != self.manifest.shards[shard].samples:
                raise CorruptContent(f"{url}: {len(entries)} samples, the manifest says "
                                     f"{self.manifest.shards[shard].samples}; the index belongs to another "
                                     f"version of the shard (check with `pixeldit shards verify`)")
            self._index[shard] = entries
        return self._index[shard]

    def read_run(self, shard: int, first: int, stop: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(member index, key, files) for members first..stop−1 of `shard`, each exactly once."""
        url = self.url(shard)
        entries = self.index(shard)
        fs = None if is_local(url) else filesystem(url, self.options)
        retrying = Retrying(url, io_timeout(self.options))
        member = first
        shard_end = self.manifest.shards[shard].bytes
        while member < stop:
            started = time.monotonic()
            try:
                with MappedFile(strip_protocol(url)) if fs is None else \
                        io.BufferedReader(RangedFile(fs, url), CHUNK_BYTES) as f:
                    # a shard shorter than its manifest entry was cut (a partial upload, a full disk):
                    # the samples before the cut are delivered, those after it are content to skip
                    size = len(f.view) if fs is None else f.raw.size
                    intact = intact_samples(entries, size) if size < shard_end else len(entries)
                    if member < intact:
                        f.seek(entries.offsets[member])
                    while member < stop:
                        if member >= intact:
                            yield member, entries.keys[member], TruncatedSample(
                                f"{url} ends at byte {size} of {shard_end}, inside this sample or before it")
                            member += 1
                            continue
                        # one read per chunk of whole samples, parsed from memory: per-member reads
                        # through fsspec cost more CPU than the parsing itself
                        base, last = entries.offsets[member], member + 1
                        while last < min(stop, intact) and entries.offsets[last] - base < CHUNK_BYTES:
                            last += 1
                        end = min(entries.offsets[last] if last < len(entries) else shard_end, size)
                        started = time.monotonic()
                        view = memoryview(read_exact(f, end - base, url))
                        retrying.succeeded()
                        self.stats.retries += client_retries(fs)
                        members = None
                        while member < last:
                            # the index gives every member's offset and size: slice, checking only
                            # the name in each header; parse the headers if the index disagrees
                            sliced = None if members else slice_sample(view, base, entries, member)
                            if sliced is None:
                                if members is None:
                                    members = iter_members(io.BytesIO(view[entries.offsets[member] - base:]), url)
                                try:
                                    sliced = read_sample(members, len(entries[member].members), url)
                                except CorruptHeader as e:
                                    # the stream is lost inside this sample; the index says where the next starts
                                    members = None
                                    sliced = entries.keys[member], DamagedSample(f"{e}; the index has no name to "
                                                                                f"check it by")
                            key, files = sliced
                            yield member, key, files
                            member += 1
            except STORAGE_EXCEPTIONS as e:
                self.stats.retries += client_retries(fs)
                # transient: back off, then reopen at `member`; anything else is raised, typed
                retrying.wait(e, started)
                self.stats.retries += 1
                log.info("%s: reopening at sample %d", url, member)

    def _count_retry(self, error: BaseException):
        self.stats.retries += 1


@dataclass
class RawSample:
    canonical: int
    key: str
    files: dict[str, bytes | memoryview]  # views into the read chunk on the indexed path


def iter_lane(plan: EpochPlan, reader: ShardReader, lane: int, window: int,
              start_sample: int = 0) -> Iterator[RawSample]:
    """The lane's samples from position `start_sample` on, window-shuffled, one per position.

    The reader yields every member it is asked for (content it cannot use comes as a placeholder
    the loader skips and counts), so a position without a sample is a bug.
    """
    seq = plan.lane_sequence(lane)
    for w, (lo, hi) in enumerate(window_bounds(len(seq), window)):
        if hi <= start_sample:
            continue
        chunk = seq[lo:hi]
        members = chunk.tolist()  # Python ints: indexing the array would make a numpy scalar per sample
        wanted = set(members)
        got: dict[int, RawSample] = {}
        for shard, first, stop in _runs(plan, chunk):
            base = int(plan.shard_offsets[shard])
            for member, key, files in reader.read_run(shard, first, stop):
                if base + member in wanted:
                    got[base + member] = RawSample(base + member, key, files)
        order = window_order(plan.seed, plan.epoch, plan.split, lane, w, len(chunk))
        for i in order[max(0, start_sample - lo):].tolist():
            yield got[members[i]]


def _runs(plan: EpochPlan, chunk: np.ndarray) -> list[tuple[int, int, int]]:
    """Group canonical indices into (shard, first member, stop member) runs, in sequence order."""
    runs: list[list[int]] = []
    shards = np.searchsorted(plan.shard_offsets, chunk, side="right") - 1
    for shard, member in zip(shards.tolist(), (chunk - plan.shard_offsets[shards]).tolist()):
        if runs and runs[-1][0] == shard and member >= runs[-1][2] and member - runs[-1][2] < 64:
            runs[-1][2] = member + 1  # small gaps (dropped samples) are read through, not reopened
        else:
            runs.append([shard, member, member + 1])
    return [tuple(r) for r in runs]
