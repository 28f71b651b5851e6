"""`build_loader(cfg, rank, world_size)`: batches {image uint8, label, key} from shards, resumable.

Two decoders share one sample source (source.py): `pil` reads the lanes on threads of this
process and has persistent decode processes (decode_processes.py) decode each batch into shared
memory that becomes the batch tensor; `dali` gets the encoded bytes from the same lanes and
decodes with DALI (`mixed` on a GPU, `cpu` otherwise). Either way the rank sees the same keys in
the same order, and `state_dict()` after k batches lets a new loader continue with batch k + 1.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from ..diffusion.randomness import stream_seed
from ..errors import CheckpointError, ConfigError, DataError
from . import images
from .decode_processes import DecodeProcess, DecodeProcesses, Inbox, Segment, shared_array
from .features import (
    FeatureManifest,
    LockstepReader,
    check_mirrors,
    load_feature_manifest,
    repa_files,
)
from .features import decode as decode_features
from .index_shards import label_from
from .manifest import Manifest, manifest_url, read_manifest
from .source import (
    EpochPlan,
    ReadStats,
    ShardReader,
    Split,
    interleave,
    iter_lane,
    lane_position,
)
from ..storage import storage_options
from .tario import DamagedSample

log = logging.getLogger(__name__)
STATE_VERSION = 1
THREADS_PER_PROCESS = 2  # one reads the next batch while the other's batch is being decoded
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def to_model_input(batch: dict, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to `device` and scale its uint8 images to [−1, 1] there (4× fewer bytes moved)."""
    image = batch["image"].to(device, non_blocking=True).to(dtype)
    return image / 127.5 - 1.0, batch["label"].to(device, non_blocking=True)


def repa_target(batch: dict, device) -> torch.Tensor:
    """The batch's cached REPA targets (B, T, C) as fp32 on `device` (shipped in 16 bits)."""
    return batch["repa"].to(device, non_blocking=True).float()


def sample_target(spec: LoaderSpec, raw, flipped: bool) -> torch.Tensor:
    where = f"{spec.features_root} (sample {raw.key!r})"
    return decode_features(repa_files(raw.files), spec.features, flipped, where)


def flip_coin(seed: int, epoch: int, canonical: int) -> bool:
    """Per-sample flip decision, decoder-independent: both decoders flip the same images."""
    return bool(stream_seed(seed, 13, epoch, canonical) & 1)


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


def image_bytes(files: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            return files[ext]
    return None


class Unusable(Exception):
    """A sample whose content cannot train: skipped and counted under `reason`, never fatal alone."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def label_of(files: dict[str, bytes], manifest: Manifest) -> int:
    """The sample's class, read from the manifest's label sources as `shards index` read it, and
    checked against the manifest's classes (a label equal to the class count would pass for the
    guidance null class, a larger one would fail inside the model)."""
    num_classes = len(manifest.classes)
    cls = files.get("cls") if manifest.label_sources[0] == "cls" else None
    # the common case without label_from's regex: plain ASCII digits are what it would accept
    text = bytes(cls).strip() if cls is not None else b""
    if text.isdigit():
        label = int(text)
    else:
        _, label, problem = label_from(files, tuple(manifest.label_sources))
        if problem is not None:
            raise Unusable("bad_label", problem)
    if not 0 <= label < num_classes:
        raise Unusable("label_out_of_range", f"label {label} is outside the manifest's classes 0..{num_classes - 1}")
    return label


def shard_name(manifest: Manifest, canonical: int) -> str:
    counts = np.cumsum([s.samples for s in manifest.shards])
    return manifest.shards[int(np.searchsorted(counts, canonical, side="right"))].name


def admit(spec: LoaderSpec, raw, stats: ReadStats) -> tuple[bytes, int] | None:
    """(image bytes, label) of a sample worth decoding; anything else is skipped and counted here."""
    try:
        if isinstance(raw.files, DamagedSample):
            raise Unusable(raw.files.reason, raw.files.detail)
        data = image_bytes(raw.files)
        if data is None:
            raise Unusable("no_image", f"no image among {sorted(raw.files)}")
        return data, label_of(raw.files, spec.manifest)
    except Unusable as e:
        skip(stats, spec, raw, e.reason, e.detail)
        return None


# (root, shard) warned about once in this process: a cut shard skips every sample after the cut, every epoch
_truncated_shards: set[tuple[str, str]] = set()


def skip(stats: ReadStats, spec: LoaderSpec, raw, reason: str, detail: str):
    shard = shard_name(spec.manifest, raw.canonical)
    stats.skip(reason, shard, raw.key, detail)
    if reason != "truncated":
        log.warning("skipping sample %r of %s (%s): %s", raw.key, shard, reason, detail)
    elif (spec.root, shard) not in _truncated_shards:  # two threads may both warn once: harmless
        _truncated_shards.add((spec.root, shard))
        log.warning("skipping sample %r of %s (truncated): %s; the shard's other samples after the cut are "
                    "skipped and counted without a warning (data/skipped/truncated, skipped.jsonl)",
                    raw.key, shard, detail)


def decode_image(data: bytes, size: int, crop: bool) -> torch.Tensor:
    """(3, S, S) uint8 (a view of pixel-order memory), for callers that decode one image at a time."""
    out = np.empty((size, size, 3), dtype=np.uint8)
    images.decode_into(data, out, crop)
    return torch.from_numpy(out).permute(2, 0, 1)


class BatchBuffers:
    """Host memory for a loader's batches, lent to one batch at a time and taken back when it dies.

    A fresh 6 MB batch costs its page faults on every step; recycled buffers are already
    mapped. Each batch gets a lease: a new numpy view of a pooled array, which
    `torch.from_numpy` keeps alive for exactly as long as any tensor or view of that memory
    lives. A finalizer on the lease returns the array to the pool, so a buffer is never handed
    out while a batch still uses it, whatever the interpreter does with reference counts.
    `shared` buffers are in shared memory, for decode processes to write into. On CUDA hosts
    in-process buffers come from PyTorch's pinned-memory cache instead, which also waits for
    asynchronous copies out of a block before reusing it, and saves the copy `pin_memory()`
    would make. One pool serves all decode threads (and outlives epochs).
    """

    def __init__(self, pinned: bool = False, keep: int = 16, shared: bool = False):
        self.pinned, self.keep, self.shared = pinned, keep, shared
        self.owned = 0                      # pooled arrays, lent or idle
        self.idle: list[np.ndarray] = []
        # finalizers run wherever the last reference drops, even inside `take` under the lock
        # (a garbage collection): they only append here, which needs no lock
        self.returned: collections.deque[np.ndarray] = collections.deque()
        self.segments: dict[int, Segment] = {}  # by data pointer, for shared buffers
        self.lock = threading.Lock()
        self.generation = 0  # close() starts a new one: leases of an older pool do not come back

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.pinned:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        with self.lock:
            while self.returned:
                self.idle.append(self.returned.popleft())
            array = next((a for a in self.idle if a.shape == shape), None)
            if array is not None:
                self.idle.remove(array)
            else:
                pooled = self.owned < self.keep  # a consumer that hoards batches gets fresh ones
                if self.shared:
                    array, segment = shared_array(shape, one_off=not pooled)
                    self.segments[array.ctypes.data] = segment
                else:
                    array = np.empty(shape, dtype=np.uint8)
                if not pooled:
                    return torch.from_numpy(array)
                self.owned += 1
            generation = self.generation
        lease = array.view()
        weakref.finalize(lease, self._give_back, array, generation)
        return torch.from_numpy(lease)

    def _give_back(self, array: np.ndarray, generation: int):
        if generation == self.generation:
            self.returned.append(array)

    def segment(self, pixels: torch.Tensor) -> Segment:
        """The shared memory behind `pixels`, a tensor `take` returned."""
        with self.lock:
            segment = self.segments[pixels.data_ptr()]
            if segment.one_off:  # the process has its mapping, the batch its own: no one needs the name again
                del self.segments[pixels.data_ptr()]
        return segment

    def close(self):
        """Let go of the pool; batches already handed out keep their memory."""
        with self.lock:
            self.generation += 1
            self.owned = 0
            self.segments.clear()
            self.idle.clear()
            self.returned.clear()


def decode_here(datas, pixels: torch.Tensor, crop: bool, flips) -> dict[int, str]:
    return images.decode_batch(datas, pixels.numpy(), crop, flips)


def decode_in(process: DecodeProcess, buffers: BatchBuffers, inbox: Inbox):
    """`decode_here`, done by `process` into the shared buffer `pixels` lives in."""
    def decode(datas, pixels: torch.Tensor, crop: bool, flips) -> dict[int, str]:
        return process.decode(inbox, datas, buffers.segment(pixels), tuple(pixels.shape), crop, flips)
    return decode


def _collate(spec: LoaderSpec, epoch: int, samples: list, stats: ReadStats, buffers: BatchBuffers,
             decode=decode_here) -> dict:
    """Decode one batch; a sample that will not decode is skipped and counted.

    Each image is decoded into its slot of the batch. The batch is (B, 3, H, W) in channels-last
    memory: JPEG decoders produce interleaved pixels, and a CHW batch would transpose every image
    (measured 15 ms per 32 × 256² batch, a third of the decode time). The device-side float
    conversion absorbs the layout.
    """
    size = spec.image_size
    pixels = buffers.take((len(samples), size, size, 3))
    present, datas, labels_of_present = [], [], []
    for raw in samples:
        admitted = admit(spec, raw, stats)
        if admitted is None:
            continue
        present.append(raw)
        datas.append(admitted[0])
        labels_of_present.append(admitted[1])
    flips = [spec.hflip and flip_coin(spec.seed, epoch, raw.canonical) for raw in present]
    failures = decode(datas, pixels, spec.needs_resize(), flips)
    labels, keys, indices, targets = [], [], [], []
    for i, (raw, flipped, label) in enumerate(zip(present, flips, labels_of_present)):
        if i in failures:
            skip(stats, spec, raw, "undecodable", failures[i])
            continue
        if spec.features is not None:
            targets.append(sample_target(spec, raw, flipped))
        labels.append(label)
        keys.append(raw.key)
        indices.append(raw.canonical)
    image = pixels[:len(keys)].permute(0, 3, 1, 2)
    batch = {"image": image, "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
             "index": torch.tensor(indices, dtype=torch.int64), "stats": stats}
    if spec.features is not None:
        batch["repa"] = stack_targets(spec, targets)
    return batch


def stack_targets(spec: LoaderSpec, targets: list[torch.Tensor]) -> torch.Tensor:
    f = spec.features
    dtype = torch.bfloat16 if f.dtype == "bf16" else torch.float16
    return torch.stack(targets) if targets else torch.empty(0, f.tokens, f.dim, dtype=dtype)


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


def lane_batches(spec: LoaderSpec, epoch: int, lane: int, start_batch: int, decode: bool = True,
                 buffers: BatchBuffers | None = None) -> Iterator[dict]:
    plan = EpochPlan(spec.manifest, spec.seed, epoch, spec.split)
    reader = ShardReader(spec.manifest, spec.root, spec.options)
    if spec.features is not None:
        reader = LockstepReader(reader, ShardReader(spec.features, spec.features_root, spec.options))
    samples = iter_lane(plan, reader, lane, spec.window, start_batch * spec.batch)
    buffers = buffers or BatchBuffers()
    for group in batched(samples, spec.batch):
        if len(group) != spec.batch:
            raise AssertionError("lanes are batch-aligned; a partial batch means a planning bug")
        stats, reader.stats = reader.stats, ReadStats()
        yield _collate(spec, epoch, group, stats, buffers) if decode else (group, stats)


def batches_in_flight(threads: int, prefetch: int) -> int:
    """Batches being decoded or waiting for the consumer: each thread's own plus `prefetch` more."""
    return max(1, threads) * (prefetch + 1)


def join_all(threads: list[threading.Thread], deadline_s: float, doing: dict[str, str]):
    """Join `threads` within `deadline_s` in all; name what any still running is doing.

    The threads are daemons: one stuck in a read past every storage deadline is left behind
    rather than holding the run, and the log says what it was waiting for.
    """
    deadline = time.monotonic() + deadline_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [f"{t.name}: {doing.get(t.name, 'finishing')}" for t in threads if t.is_alive()]
    if stuck:
        log.error("%d loader thread(s) still running %.0fs after the epoch stopped, left behind: %s",
                  len(stuck), deadline_s, "; ".join(stuck))


def threaded_batches(spec: LoaderSpec, epoch: int, batches_done: int, processes: DecodeProcesses, prefetch: int,
                     buffers: BatchBuffers, pin: bool, join_deadline_s: float = 300.0) -> Iterator[dict]:
    """The rank's batches in lane order, each read by whichever thread is free and decoded by its process.

    Threads are not tied to lanes: with one thread per lane, a lane held up (a large image, a
    core taken by another process) stalls every other lane as soon as they are `prefetch`
    batches ahead, and on two cores that idled 10-20% of the decode time. Here a thread claims
    the next batch, waits its turn to read it from its lane (lanes are read in order), and
    has its process decode it while other threads read and decode later batches. At most
    threads × (prefetch + 1) batches are in flight or waiting for the consumer. `pin`: copy
    batches into page-locked memory for asynchronous copies to the GPU, as DataLoader's
    pin_memory does (shared memory is not page-locked).
    """
    lanes = spec.split.lanes
    total = EpochPlan(spec.manifest, spec.seed, epoch, spec.split).batches_per_rank
    groups = [lane_batches(spec, epoch, lane, lane_position(batches_done, lanes, lane), decode=False)
              for lane in range(lanes)]
    read_turn = [lane_position(batches_done, lanes, lane) for lane in range(lanes)]
    turns = threading.Lock()
    turn_changed = [threading.Condition(turns) for _ in range(lanes)]  # wakes only the threads of that lane
    state = threading.Lock()  # guards: claimed, delivered, finished, stopped
    room, ready = threading.Condition(state), threading.Condition(state)  # for the threads, for the consumer
    claimed, delivered, finished, stopped = batches_done, batches_done, {}, False
    ahead = batches_in_flight(THREADS_PER_PROCESS * processes.count, prefetch)
    doing: dict[str, str] = {}  # by thread name: what it is busy with, for a join that times out

    def read(k: int):
        lane, position = k % lanes, k // lanes
        doing[threading.current_thread().name] = f"waiting to read batch {k} (lane {lane})"
        with turn_changed[lane]:
            turn_changed[lane].wait_for(lambda: read_turn[lane] == position)
        doing[threading.current_thread().name] = f"reading batch {k} (lane {lane}) from storage"
        try:  # outside the lock: other lanes stream at the same time (object storage latency)
            return next(groups[lane])
        finally:
            with turn_changed[lane]:
                read_turn[lane] += 1
                turn_changed[lane].notify_all()

    def work(process: DecodeProcess):
        inbox = process.take_inbox()
        try:
            decode_lane(decode_in(process, buffers, inbox))
        finally:
            process.return_inbox(inbox)

    def decode_lane(decode):
        nonlocal claimed
        while True:
            with room:
                room.wait_for(lambda: stopped or claimed >= total or claimed < delivered + ahead)
                if stopped or claimed >= total:
                    return
                k, claimed = claimed, claimed + 1
            try:
                group, stats = read(k)
                doing[threading.current_thread().name] = f"decoding batch {k}"
                batch = _collate(spec, epoch, group, stats, buffers, decode)
                if pin:
                    batch.update({name: batch[name].pin_memory() for name in ("image", "repa") if name in batch})
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer, in batch order
                batch = e
            with ready:
                finished[k] = batch
                ready.notify()

    started = []
    try:
        for i, process in enumerate(processes.running() * THREADS_PER_PROCESS):
            started.append(threading.Thread(target=work, args=(process,), daemon=True,
                                            name=f"pixeldit-loader-{epoch}-{i}"))
            started[-1].start()
        for k in range(batches_done, total):
            with ready:
                ready.wait_for(lambda: k in finished)
                batch = finished.pop(k)
                delivered = k + 1
                room.notify()  # one more batch may be claimed
            if isinstance(batch, BaseException):
                raise batch
            yield batch
    finally:
        with room:
            stopped = True  # threads finish the batch in hand and quit
            room.notify_all()
        # so that nothing uses the processes or buffers after the epoch
        join_all(started, join_deadline_s, doing)


class ShardLoader:
    """Iterates one epoch per `iter()`; the next `iter()` continues with the next epoch.

    Samples whose content cannot train are skipped (counted by reason in `stats`, listed in
    `skipped_log`); more than `max_skipped_fraction` of the rank's epoch lost, or an epoch that
    delivers nothing, stops the run with a DataError. `join_deadline_s` bounds the wait for
    reader threads when an epoch stops.
    """

    def __init__(self, spec: LoaderSpec, decoder: str = "pil", num_workers: int = 0, device: str = "cpu",
                 prefetch: int = 2, max_skipped_fraction: float = 1.0, skipped_log: str | None = None,
                 join_deadline_s: float = 300.0):
        if decoder not in ("pil", "dali"):
            raise ConfigError(f"data.decoder={decoder!r}: expected 'pil' or 'dali'")
        self.spec, self.decoder, self.num_workers = spec, decoder, num_workers
        self.device, self.prefetch = torch.device(device), prefetch
        self.max_skipped_fraction, self.skipped_log = max_skipped_fraction, skipped_log
        self.skipped_log_checked = False  # a run dir may hold the list of a run that stopped later
        self.join_deadline_s = join_deadline_s
        self.epoch, self.batches_done = 0, 0
        self.epoch_delivered, self.epoch_lost = 0, 0  # samples of the current epoch, for the budget
        self.epoch_skipped: dict[str, int] = {}        # the current epoch's skips by reason, for messages
        self.stats = ReadStats()
        if decoder == "pil" and num_workers > 0 and not hasattr(os, "memfd_create"):
            raise ConfigError(f"data.num_workers={num_workers}: the pil decoder's decode processes need Linux "
                             f"(memfd_create); use data.num_workers=0 here")
        # started with the first epoch, kept until close() or until the loader is garbage
        self.processes = DecodeProcesses(num_workers) if decoder == "pil" and num_workers > 0 else None
        # + 4: the batches the consumer still holds (the step in flight, the one before it)
        self.buffers = BatchBuffers(pinned=self.device.type == "cuda" and self.processes is None,
                                    keep=batches_in_flight(THREADS_PER_PROCESS * num_workers, prefetch) + 4,
                                    shared=self.processes is not None)
        self._finalize = weakref.finalize(self, ShardLoader._release, self.processes, self.buffers)

    @staticmethod
    def _release(processes: DecodeProcesses | None, buffers: BatchBuffers):
        if processes is not None:
            processes.close()
        buffers.close()

    def close(self):
        """Stop the decode processes (a later epoch starts them again) and free the batch pool."""
        self._release(self.processes, self.buffers)  # idempotent: the finalizer may run it again

    def __len__(self) -> int:
        return EpochPlan(self.spec.manifest, self.spec.seed, self.epoch, self.spec.split).batches_per_rank

    def __iter__(self) -> Iterator[dict]:
        total = len(self)
        if not self.skipped_log_checked:
            self.prune_skipped()
            self.skipped_log_checked = True
        if self.decoder == "dali":
            from .dali import dali_batches
            batches = dali_batches(self.spec, self.epoch, self.batches_done, self.device, self.prefetch,
                                   join_deadline_s=self.join_deadline_s)
        elif self.num_workers > 0:
            batches = threaded_batches(self.spec, self.epoch, self.batches_done, self.processes, self.prefetch,
                                       self.buffers, pin=self.device.type == "cuda",
                                       join_deadline_s=self.join_deadline_s)
        else:
            lanes = self.spec.split.lanes
            first = self.batches_done % lanes
            batches = interleave([lane_batches(self.spec, self.epoch, lane,
                                               lane_position(self.batches_done, lanes, lane), buffers=self.buffers)
                                  for lane in range(lanes)], start=first)
        for batch in batches:
            self.account(batch.pop("stats"), len(batch["key"]), total)
            yield batch
        if self.batches_done != total:
            raise RuntimeError(f"epoch {self.epoch} ended after {self.batches_done} of {total} batches")
        if self.epoch_delivered == 0:
            raise DataError(f"{self.spec.root}: epoch {self.epoch} delivered no sample "
                            f"({self.lost_summary()}); check the shards with `pixeldit shards verify --decode`")
        self.epoch += 1
        self.batches_done = 0
        self.epoch_delivered, self.epoch_lost, self.epoch_skipped = 0, 0, {}

    def account(self, stats: ReadStats, delivered: int, total: int):
        """Count a batch's samples and skips; stop the run once the epoch's skip budget is spent."""
        self.write_skipped(stats.records)
        stats.records = []
        self.stats.add(stats)
        for reason, count in stats.skipped.items():
            self.epoch_skipped[reason] = self.epoch_skipped.get(reason, 0) + count
        self.batches_done += 1
        self.epoch_delivered += delivered
        self.epoch_lost += self.spec.batch - delivered
        budget = self.max_skipped_fraction * total * self.spec.batch
        if self.epoch_lost > budget:
            where = f" (listed in {self.skipped_log})" if self.skipped_log else ""
            raise DataError(f"{self.spec.root}: {self.epoch_lost} samples of epoch {self.epoch} skipped by batch "
                            f"{self.batches_done} of {total} ({self.lost_summary()}){where}, over the budget of "
                            f"{budget:g} (data.max_skipped_fraction={self.max_skipped_fraction:g} of "
                            f"{total * self.spec.batch}); repair the shards (`pixeldit shards verify --decode`) "
                            f"or raise data.max_skipped_fraction")

    def lost_summary(self) -> str:
        """The current epoch's skips by reason."""
        return ", ".join(f"{reason} {n}" for reason, n in self.epoch_skipped.items() if n) or "nothing skipped"

    def write_skipped(self, records: list):
        if not records or self.skipped_log is None:
            return
        lines = [json.dumps({**asdict(r), "epoch": self.epoch, "batch": self.batches_done}) + "\n"
                 for r in records]
        with open(self.skipped_log, "a") as f:
            f.writelines(lines)

    def prune_skipped(self):
        """Keep only what was skipped before the position this loader starts at: the batches after it
        are read again (after a resume, or a fresh start in a run dir that has a list) and list their
        skips again."""
        if self.skipped_log is None or not os.path.exists(self.skipped_log):
            return
        with open(self.skipped_log) as f:
            lines = [line for line in f if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                if i < len(lines) - 1:  # only a crash mid-write leaves a broken line, and only the last
                    raise DataError(f"{self.skipped_log}: line {i + 1} is not JSON; the list was edited or damaged: "
                                    f"move it away to start a new one") from None
        kept = [line for line, r in zip(lines, records) if (r["epoch"], r["batch"]) < (self.epoch, self.batches_done)]
        if len(kept) != len(lines):
            tmp = f"{self.skipped_log}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.skipped_log)

    def state_dict(self) -> dict:
        s = self.spec.split
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches_done": self.batches_done,
                "seed": self.spec.seed, "world": s.world, "rank": s.rank, "lanes": s.lanes, "batch": s.batch,
                "num_samples": self.spec.manifest.num_samples, "stats": self.stats.as_dict(),
                "epoch_delivered": self.epoch_delivered, "epoch_lost": self.epoch_lost,
                "epoch_skipped": dict(self.epoch_skipped)}

    def load_state_dict(self, state: dict):
        """Continue where `state` stopped.

        Same world size, lanes and batch: exactly the remaining sequence. Another
        world size or lane count: the same number of global samples of the current
        epoch counts as done and the rest of the epoch is re-split, so within that
        epoch some samples repeat and others are skipped; later epochs are exact.
        """
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"loader state version {state.get('version')} is not {STATE_VERSION}: the "
                                  f"checkpoint was written by another version of pixeldit; resume it with that version")
        if state["num_samples"] != self.spec.manifest.num_samples or state["seed"] != self.spec.seed:
            raise CheckpointError(
                f"the checkpoint's loader state is for {state['num_samples']} samples / train.seed={state['seed']}, "
                f"but {self.spec.root} has {self.spec.manifest.num_samples} samples / train.seed={self.spec.seed}: "
                f"resume with the data.source and train.seed the run started with, or start a new run dir")
        s = self.spec.split
        self.epoch = state["epoch"]
        self.stats = ReadStats.from_dict(state["stats"])
        if (state["world"], state["lanes"], state["batch"]) == (s.world, s.lanes, s.batch):
            self.batches_done = state["batches_done"]
            # states written before the skip budget lost nothing they counted: every batch was full
            self.epoch_delivered = state.get("epoch_delivered", self.batches_done * s.batch)
            self.epoch_lost = state.get("epoch_lost", 0)
            self.epoch_skipped = dict(state.get("epoch_skipped", {}))
            return
        done = state["batches_done"] * state["world"] * state["batch"]
        self.batches_done = min(done // (s.world * s.batch), len(self))
        # the old split's counts were this rank's share of another order: the budget starts again at
        # this position, as if the re-split batches before it were delivered whole
        self.epoch_delivered, self.epoch_lost, self.epoch_skipped = self.batches_done * s.batch, 0, {}
        log.warning("resuming with world %d x lanes %d x batch %d (state: %d x %d x %d): epoch %d continues at "
                    "batch %d of a re-split order; samples may repeat or be skipped until the epoch ends",
                    s.world, s.lanes, s.batch, state["world"], state["lanes"], state["batch"], self.epoch,
                    self.batches_done)


def build_loader(cfg, rank: int, world_size: int, device: str = "cpu", run_dir: str | None = None) -> ShardLoader:
    """The trainer's entry point: cfg is the full Config (data, model and train sections are read).

    With `run_dir`, skipped samples are listed in `<run_dir>/skipped.jsonl` (rank 0) or
    `skipped.rank<r>.jsonl`: each rank lists what it skipped itself.
    """
    data = cfg.data
    options = storage_options(data.endpoint_url, data.io_timeout_s, data.retries)
    manifest, images_sha256 = read_manifest(data.source, options)
    check_class_count(cfg.model.arch().num_classes, manifest, data.source)
    per_rank = cfg.train.layout(world_size).per_rank
    lanes = max(1, data.num_workers)
    features = None
    if cfg.repa.mode == "cached":
        features = load_feature_manifest(cfg.repa.features, options)
        check_feature_set(features, manifest, images_sha256, cfg)
    spec = LoaderSpec(manifest=manifest, root=data.source, image_size=data.image_size, batch=per_rank,
                      seed=cfg.train.seed, split=Split(world_size, rank, lanes, per_rank),
                      window=data.shuffle_window, hflip=data.hflip, options=options,
                      features=features,
                      features_root=cfg.repa.features)
    skipped_log = None
    if run_dir is not None:
        skipped_log = os.path.join(run_dir, "skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl")
    # a thread whose reads keep failing gives up within io_timeout_s; one still reading (a batch's next()
    # may read a whole shuffle window of healthy data) is left behind past this, a daemon, and logged
    return ShardLoader(spec, data.decoder, data.num_workers, device, max_skipped_fraction=data.max_skipped_fraction,
                       skipped_log=skipped_log, join_deadline_s=data.io_timeout_s + 60)


def check_class_count(num_classes: int, manifest: Manifest, source: str):
    """Refuse a model whose class count differs from the data's, before any work: more data classes
    would reach the model as its guidance null class or beyond, fewer would train and draw classes
    the data never had. The demo's synthetic data has at most 10 classes by design, for any model
    (`pixeldit sample` draws only the classes a run's data had)."""
    n = len(manifest.classes)
    if num_classes != n and not (manifest.source == "synthetic" and n < num_classes):
        raise ConfigError(f"model.num_classes={num_classes} but {manifest_url(source)} has {n} classes; "
                          f"train with --set model.num_classes={n}")


def check_feature_set(features: FeatureManifest, images: Manifest, images_sha256: str, cfg):
    """Refuse a feature cache that does not belong to this data, resolution, encoder or flip setting."""
    where = f"repa.features={cfg.repa.features}"
    check_mirrors(features, images, where)
    if features.images_sha256 != images_sha256:
        raise DataError(f"{where}: computed from another version of {manifest_url(cfg.data.source)} (image "
                        f"manifest sha256 {features.images_sha256[:12]}..., now {images_sha256[:12]}...); "
                        f"rerun `pixeldit repa-cache`")
    tokens = (cfg.data.image_size // cfg.model.arch().patch_size) ** 2
    if features.image_size != cfg.data.image_size or features.tokens != tokens:
        raise DataError(f"{where}: cached for {features.image_size}px images ({features.tokens} tokens); "
                        f"data.image_size={cfg.data.image_size} needs {tokens} tokens: rerun `pixeldit repa-cache` "
                        f"at this size or point repa.features at a cache made for it")
    if features.dim != cfg.repa.encoder_dim:
        raise DataError(f"{where}: {features.dim}-wide features ({features.encoder}), "
                        f"repa.encoder_dim={cfg.repa.encoder_dim}: set --set repa.encoder_dim={features.dim} or "
                        f"recache with the configured encoder")
    if cfg.data.hflip and features.flip == "none":
        raise DataError(f"{where}: cached with flip=none but data.hflip=true; recache with --flip both or grid")
