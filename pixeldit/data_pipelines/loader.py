"""`build_loader(settings, rank, world_size)`: batches {image uint8, label, key} from shards, resumable.

Two decoders share one sample source (source.py, lanes.py) and one per-sample record
(samples.py): `pil` reads the lanes on threads of this process and has persistent decode
processes (decode_processes.py) decode each batch into shared memory that becomes the batch
tensor; `dali` (dali.py) gets the encoded bytes from the same lanes and decodes with DALI
(`mixed` on a GPU, `cpu` otherwise). Either way the rank sees the same keys in the same order,
and `state_dict()` after k batches lets a new loader continue with batch k + 1.
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

from ..errors import CheckpointError, ConfigError, DataError
from ..storage import storage_options
from . import images
from .dali import dali_batches
from .decode_processes import DecodeProcess, DecodeProcesses, Inbox, Segment, shared_array
from .features import FeatureManifest, check_mirrors, load_feature_manifest
from .lanes import Group, LoaderSpec, every_lane, rank_groups
from .manifest import Manifest, manifest_url, read_manifest
from .samples import admit, drop_undecodable, to_batch
from .source import ReadStats, Split, lane_position

log = logging.getLogger(__name__)
STATE_VERSION = 1
THREADS_PER_PROCESS = 2  # one reads the next batch while the other's batch is being decoded


def to_model_input(batch: dict, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to `device` and scale its uint8 images to [−1, 1] there (4× fewer bytes moved)."""
    image = batch["image"].to(device, non_blocking=True).to(dtype)
    return image / 127.5 - 1.0, batch["label"].to(device, non_blocking=True)


def repa_target(batch: dict, device) -> torch.Tensor:
    """The batch's cached REPA targets (B, T, C) as fp32 on `device` (shipped in 16 bits)."""
    return batch["repa"].to(device, non_blocking=True).float()


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


def collate(spec: LoaderSpec, epoch: int, group: list, stats: ReadStats, buffers: BatchBuffers,
            decode=decode_here) -> dict:
    """Decode one batch; a sample that will not decode is skipped and counted.

    Each image is decoded into its slot of the batch. The batch is (B, 3, H, W) in channels-last
    memory: JPEG decoders produce interleaved pixels, and a CHW batch would transpose every image
    (measured 15 ms per 32 × 256² batch, a third of the decode time). The device-side float
    conversion absorbs the layout.
    """
    size = spec.image_size
    pixels = buffers.take((len(group), size, size, 3))
    samples = admit(spec, epoch, group, stats)
    failures = decode([s.data for s in samples], pixels, spec.needs_resize(), [s.flipped for s in samples])
    samples = drop_undecodable(spec, samples, failures, stats)
    return to_batch(spec, samples, pixels[:len(samples)].permute(0, 3, 1, 2), stats)


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


class LaneTurns:
    """Reads each lane's batches in order, whichever thread claimed them: the thread with a lane's
    batch at position p waits until the batch at p − 1 was read. The read itself is outside the
    lock, so other lanes stream at the same time (object storage latency)."""

    def __init__(self, spec: LoaderSpec, epoch: int, batches_done: int, doing: dict[str, str]):
        self.lanes = spec.split.lanes
        self.groups = every_lane(spec, epoch, batches_done)
        self.turn = [lane_position(batches_done, self.lanes, lane) for lane in range(self.lanes)]
        turns = threading.Lock()
        self.changed = [threading.Condition(turns) for _ in range(self.lanes)]  # wakes only that lane's threads
        self.doing = doing  # by thread name: what it is busy with, for a join that times out

    def read(self, k: int) -> Group:
        lane, position = k % self.lanes, k // self.lanes
        me = threading.current_thread().name
        self.doing[me] = f"waiting to read batch {k} (lane {lane})"
        with self.changed[lane]:
            self.changed[lane].wait_for(lambda: self.turn[lane] == position)
        self.doing[me] = f"reading batch {k} (lane {lane}) from storage"
        try:
            return next(self.groups[lane])
        finally:
            with self.changed[lane]:
                self.turn[lane] += 1
                self.changed[lane].notify_all()


class Claims:
    """Which batch a decode thread takes next, and the finished batches the consumer takes in order.

    A thread claims the next batch while fewer than `ahead` batches are claimed past those
    delivered; a finished batch (or the exception that stopped it) waits under its number.
    """

    def __init__(self, first: int, total: int, ahead: int):
        self.total, self.ahead = total, ahead
        state = threading.Lock()
        self.room, self.ready = threading.Condition(state), threading.Condition(state)  # threads, consumer
        self.claimed, self.delivered, self.stopped = first, first, False
        self.finished: dict[int, dict | BaseException] = {}

    def claim(self) -> int | None:
        """The next batch to decode, or None when the epoch is all claimed or stopped."""
        with self.room:
            self.room.wait_for(lambda: self.stopped or self.claimed >= self.total
                               or self.claimed < self.delivered + self.ahead)
            if self.stopped or self.claimed >= self.total:
                return None
            k, self.claimed = self.claimed, self.claimed + 1
            return k

    def finish(self, k: int, batch: dict | BaseException):
        with self.ready:
            self.finished[k] = batch
            self.ready.notify()

    def take(self, k: int) -> dict | BaseException:
        with self.ready:
            self.ready.wait_for(lambda: k in self.finished)
            batch = self.finished.pop(k)
            self.delivered = k + 1
            self.room.notify()  # one more batch may be claimed
        return batch

    def stop(self):
        """Threads finish the batch in hand and claim no other."""
        with self.room:
            self.stopped = True
            self.room.notify_all()


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
    total = spec.batches_per_rank(epoch)
    doing: dict[str, str] = {}
    turns = LaneTurns(spec, epoch, batches_done, doing)
    claims = Claims(batches_done, total, batches_in_flight(THREADS_PER_PROCESS * processes.count, prefetch))

    def decode_claimed(process: DecodeProcess):
        inbox = process.take_inbox()
        try:
            decode = decode_in(process, buffers, inbox)
            while (k := claims.claim()) is not None:
                try:
                    group, stats = turns.read(k)
                    doing[threading.current_thread().name] = f"decoding batch {k}"
                    batch = collate(spec, epoch, group, stats, buffers, decode)
                    if pin:
                        batch.update({name: batch[name].pin_memory() for name in ("image", "repa") if name in batch})
                except BaseException as e:  # noqa: BLE001 - re-raised in the consumer, in batch order
                    batch = e
                claims.finish(k, batch)
        finally:
            process.return_inbox(inbox)

    started = []
    try:
        for i, process in enumerate(processes.running() * THREADS_PER_PROCESS):
            started.append(threading.Thread(target=decode_claimed, args=(process,), daemon=True,
                                            name=f"pixeldit-loader-{epoch}-{i}"))
            started[-1].start()
        for k in range(batches_done, total):
            batch = claims.take(k)
            if isinstance(batch, BaseException):
                raise batch
            yield batch
    finally:
        claims.stop()
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
        return self.spec.batches_per_rank(self.epoch)

    def __iter__(self) -> Iterator[dict]:
        total = len(self)
        if not self.skipped_log_checked:
            self.prune_skipped()
            self.skipped_log_checked = True
        for batch in self._batches():
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

    def _batches(self) -> Iterator[dict]:
        """The rest of the epoch's batches, by the configured decoder."""
        if self.decoder == "dali":
            return dali_batches(self.spec, self.epoch, self.batches_done, self.device, self.prefetch,
                                join_deadline_s=self.join_deadline_s)
        if self.num_workers > 0:
            return threaded_batches(self.spec, self.epoch, self.batches_done, self.processes, self.prefetch,
                                    self.buffers, pin=self.device.type == "cuda", join_deadline_s=self.join_deadline_s)
        return (collate(self.spec, self.epoch, group, stats, self.buffers)
                for group, stats in rank_groups(self.spec, self.epoch, self.batches_done))

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


@dataclass(frozen=True)
class LoaderSettings:
    """What the loader needs from a run's settings, as plain values (built from the config by the trainer)."""
    source: str                  # the image shards' manifest folder URL
    image_size: int
    per_rank: int                # samples per rank and step (the batch layout's)
    seed: int
    num_classes: int             # the model's, checked against the data's classes
    patch_size: int
    decoder: str
    num_workers: int
    hflip: bool
    shuffle_window: int
    endpoint_url: str | None
    retries: int
    io_timeout_s: float
    max_skipped_fraction: float
    features: str | None         # REPA feature shards read with the images (repa.mode cached), else None
    encoder_dim: int             # the width the REPA projector expects of those features


def build_loader(settings: LoaderSettings, rank: int, world_size: int, device: str = "cpu",
                 run_dir: str | None = None) -> ShardLoader:
    """The loader of `rank`, its manifest (and feature manifest) read and checked against the settings.

    With `run_dir`, skipped samples are listed in `<run_dir>/skipped.jsonl` (rank 0) or
    `skipped.rank<r>.jsonl`: each rank lists what it skipped itself.
    """
    s = settings
    options = storage_options(s.endpoint_url, s.io_timeout_s, s.retries)
    manifest, images_sha256 = read_manifest(s.source, options)
    check_class_count(s.num_classes, manifest, s.source)
    features = None
    if s.features is not None:
        features = load_feature_manifest(s.features, options)
        check_feature_set(features, manifest, images_sha256, s)
    spec = LoaderSpec(manifest=manifest, root=s.source, image_size=s.image_size, batch=s.per_rank, seed=s.seed,
                      split=Split(world_size, rank, max(1, s.num_workers), s.per_rank), window=s.shuffle_window,
                      hflip=s.hflip, options=options, features=features, features_root=s.features)
    skipped_log = None
    if run_dir is not None:
        skipped_log = os.path.join(run_dir, "skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl")
    # a thread whose reads keep failing gives up within io_timeout_s; one still reading (a batch's next()
    # may read a whole shuffle window of healthy data) is left behind past this, a daemon, and logged
    return ShardLoader(spec, s.decoder, s.num_workers, device, max_skipped_fraction=s.max_skipped_fraction,
                       skipped_log=skipped_log, join_deadline_s=s.io_timeout_s + 60)


def check_class_count(num_classes: int, manifest: Manifest, source: str):
    """Refuse a model whose class count differs from the data's, before any work: more data classes
    would reach the model as its guidance null class or beyond, fewer would train and draw classes
    the data never had. The demo's synthetic data has at most 10 classes by design, for any model
    (`pixeldit sample` draws only the classes a run's data had)."""
    n = len(manifest.classes)
    if num_classes != n and not (manifest.source == "synthetic" and n < num_classes):
        raise ConfigError(f"model.num_classes={num_classes} but {manifest_url(source)} has {n} classes; "
                          f"train with --set model.num_classes={n}")


def check_feature_set(features: FeatureManifest, images: Manifest, images_sha256: str, s: LoaderSettings):
    """Refuse a feature cache that does not belong to this data, resolution, encoder or flip setting."""
    where = f"repa.features={s.features}"
    check_mirrors(features, images, where)
    if features.images_sha256 != images_sha256:
        raise DataError(f"{where}: computed from another version of {manifest_url(s.source)} (image "
                        f"manifest sha256 {features.images_sha256[:12]}..., now {images_sha256[:12]}...); "
                        f"rerun `pixeldit repa-cache`")
    tokens = (s.image_size // s.patch_size) ** 2
    if features.image_size != s.image_size or features.tokens != tokens:
        raise DataError(f"{where}: cached for {features.image_size}px images ({features.tokens} tokens); "
                        f"data.image_size={s.image_size} needs {tokens} tokens: rerun `pixeldit repa-cache` "
                        f"at this size or point repa.features at a cache made for it")
    if features.dim != s.encoder_dim:
        raise DataError(f"{where}: {features.dim}-wide features ({features.encoder}), "
                        f"repa.encoder_dim={s.encoder_dim}: set --set repa.encoder_dim={features.dim} or "
                        f"recache with the configured encoder")
    if s.hflip and features.flip == "none":
        raise DataError(f"{where}: cached with flip=none but data.hflip=true; recache with --flip both or grid")
