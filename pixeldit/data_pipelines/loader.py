"""`build_loader(cfg, rank, world_size)`: batches {image uint8, label, key} from shards, resumable.

Two decoders share one sample source (source.py): `pil` reads the lanes on threads of this
process and has persistent decode processes (decode_processes.py) decode each batch into shared
memory that becomes the batch tensor; `dali` gets the encoded bytes from the same lanes and
decodes with DALI (`mixed` on a GPU, `cpu` otherwise). Either way the rank sees the same keys in
the same order, and `state_dict()` after k batches lets a new loader continue with batch k + 1.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..diffusion.randomness import stream_seed
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
    retries: int
    skip_failed: bool
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


def label_of(files: dict[str, bytes], where: str) -> int:
    try:
        return int(bytes(files["cls"]))  # int() reads bytes, not the memoryviews the reader hands out
    except (KeyError, ValueError):
        raise ValueError(f"{where}: sample has no integer .cls label") from None


def decode_image(data: bytes, size: int, crop: bool) -> torch.Tensor:
    """(3, S, S) uint8 (a view of pixel-order memory), for callers that decode one image at a time."""
    out = np.empty((size, size, 3), dtype=np.uint8)
    images.decode_into(data, out, crop)
    return torch.from_numpy(out).permute(2, 0, 1)


class BatchBuffers:
    """Host memory for a loader's batches, handed out again once nothing refers to it.

    A fresh 6 MB batch costs its page faults on every step; recycled buffers are already
    mapped. `torch.from_numpy` keeps a reference to its array for as long as any tensor or view
    of that memory lives, so an array referenced only by this pool is free. `shared` buffers are
    in shared memory, for decode processes to write into. On CUDA hosts in-process buffers come
    from PyTorch's pinned-memory cache instead, which also waits for asynchronous copies out of
    a block before reusing it, and saves the copy `pin_memory()` would make.
    One pool serves all decode threads (and outlives epochs): the lock makes check-and-take atomic.
    """

    def __init__(self, pinned: bool = False, keep: int = 16, shared: bool = False):
        self.pinned, self.keep, self.shared = pinned, keep, shared
        self.arrays: list[np.ndarray] = []
        self.segments: dict[int, Segment] = {}  # by data pointer, for shared buffers
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.pinned:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        with self.lock:
            for array in self.arrays:
                # references: the pool's list, this loop's name, getrefcount's argument
                if array.shape == shape and sys.getrefcount(array) == 3:
                    return torch.from_numpy(array)
            keep = len(self.arrays) < self.keep  # a consumer that hoards batches gets fresh ones
            if self.shared:
                array, segment = shared_array(shape, one_off=not keep)
                self.segments[array.ctypes.data] = segment
            else:
                array = np.empty(shape, dtype=np.uint8)
            if keep:
                self.arrays.append(array)
            return torch.from_numpy(array)

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
            self.segments.clear()
            self.arrays.clear()


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
    present, datas = [], []
    for raw in samples:
        if raw is None:
            continue
        data = image_bytes(raw.files)
        if data is None:
            skip_corrupt(stats, raw, f"ValueError: no image among {sorted(raw.files)}")
            continue
        present.append(raw)
        datas.append(data)
    flips = [spec.hflip and flip_coin(spec.seed, epoch, raw.canonical) for raw in present]
    failures = decode(datas, pixels, spec.needs_resize(), flips)
    labels, keys, indices, targets = [], [], [], []
    for i, (raw, flipped) in enumerate(zip(present, flips)):
        if i in failures:
            skip_corrupt(stats, raw, failures[i])
            continue
        if spec.features is not None:
            targets.append(sample_target(spec, raw, flipped))
        labels.append(label_of(raw.files, raw.key))
        keys.append(raw.key)
        indices.append(raw.canonical)
    image = pixels[:len(keys)].permute(0, 3, 1, 2)
    batch = {"image": image, "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
             "index": torch.tensor(indices, dtype=torch.int64), "stats": stats.as_dict()}
    if spec.features is not None:
        batch["repa"] = stack_targets(spec, targets)
    return batch


def skip_corrupt(stats: ReadStats, raw, reason: str):
    stats.corrupt += 1
    log.warning("skipping sample %r: %s", raw.key, reason)


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
    reader = ShardReader(spec.manifest, spec.root, spec.options, spec.retries, spec.skip_failed)
    if spec.features is not None:
        reader = LockstepReader(reader, ShardReader(spec.features, spec.features_root, spec.options, spec.retries,
                                                    spec.skip_failed))
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


def threaded_batches(spec: LoaderSpec, epoch: int, batches_done: int, processes: DecodeProcesses, prefetch: int,
                     buffers: BatchBuffers, pin: bool) -> Iterator[dict]:
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

    def read(k: int):
        lane, position = k % lanes, k // lanes
        with turn_changed[lane]:
            turn_changed[lane].wait_for(lambda: read_turn[lane] == position)
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
                batch = _collate(spec, epoch, *read(k), buffers, decode)
                if pin:
                    batch.update({name: batch[name].pin_memory() for name in ("image", "repa") if name in batch})
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer, in batch order
                batch = e
            with ready:
                finished[k] = batch
                ready.notify()

    started = []
    try:
        for process in processes.running() * THREADS_PER_PROCESS:
            started.append(threading.Thread(target=work, args=(process,), daemon=True))
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
        for thread in started:  # so that nothing uses the processes or buffers after the epoch
            thread.join()


class ShardLoader:
    """Iterates one epoch per `iter()`; the next `iter()` continues with the next epoch."""

    def __init__(self, spec: LoaderSpec, decoder: str = "pil", num_workers: int = 0, device: str = "cpu",
                 prefetch: int = 2):
        if decoder not in ("pil", "dali"):
            raise ValueError(f"data.decoder={decoder!r}: expected 'pil' or 'dali'")
        self.spec, self.decoder, self.num_workers = spec, decoder, num_workers
        self.device, self.prefetch = torch.device(device), prefetch
        self.epoch, self.batches_done = 0, 0
        self.stats = ReadStats()
        if decoder == "pil" and num_workers > 0 and not hasattr(os, "memfd_create"):
            raise ValueError(f"data.num_workers={num_workers}: the pil decoder's decode processes need Linux "
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
        if self.decoder == "dali":
            from .dali import dali_batches
            batches = dali_batches(self.spec, self.epoch, self.batches_done, self.device, self.prefetch)
        elif self.num_workers > 0:
            batches = threaded_batches(self.spec, self.epoch, self.batches_done, self.processes, self.prefetch,
                                       self.buffers, pin=self.device.type == "cuda")
        else:
            lanes = self.spec.split.lanes
            first = self.batches_done % lanes
            batches = interleave([lane_batches(self.spec, self.epoch, lane,
                                               lane_position(self.batches_done, lanes, lane), buffers=self.buffers)
                                  for lane in range(lanes)], start=first)
        for batch in batches:
            self.batches_done += 1
            self.stats.add(ReadStats(**batch.pop("stats")))
            yield batch
        if self.batches_done != total:
            raise RuntimeError(f"epoch {self.epoch} ended after {self.batches_done} of {total} batches")
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict:
        s = self.spec.split
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches_done": self.batches_done,
                "seed": self.spec.seed, "world": s.world, "rank": s.rank, "lanes": s.lanes, "batch": s.batch,
                "num_samples": self.spec.manifest.num_samples, "stats": self.stats.as_dict()}

    def load_state_dict(self, state: dict):
        """Continue where `state` stopped.

        Same world size, lanes and batch: exactly the remaining sequence. Another
        world size or lane count: the same number of global samples of the current
        epoch counts as done and the rest of the epoch is re-split, so within that
        epoch some samples repeat and others are skipped; later epochs are exact.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if state["num_samples"] != self.spec.manifest.num_samples or state["seed"] != self.spec.seed:
            raise ValueError(f"loader state is for {state['num_samples']} samples / seed {state['seed']}, "
                             f"this loader has {self.spec.manifest.num_samples} / {self.spec.seed}")
        s = self.spec.split
        self.epoch = state["epoch"]
        self.stats = ReadStats(**state["stats"])
        if (state["world"], state["lanes"], state["batch"]) == (s.world, s.lanes, s.batch):
            self.batches_done = state["batches_done"]
            return
        done = state["batches_done"] * state["world"] * state["batch"]
        self.batches_done = min(done // (s.world * s.batch), len(self))
        log.warning("resuming with world %d x lanes %d x batch %d (state: %d x %d x %d): epoch %d continues at "
                    "batch %d of a re-split order; samples may repeat or be skipped until the epoch ends",
                    s.world, s.lanes, s.batch, state["world"], state["lanes"], state["batch"], self.epoch,
                    self.batches_done)


def build_loader(cfg, rank: int, world_size: int, device: str = "cpu") -> ShardLoader:
    """The trainer's entry point: cfg is the full Config (data and train sections are read)."""
    data = cfg.data
    options = {"endpoint_url": data.endpoint_url} if data.endpoint_url else None
    manifest, images_sha256 = read_manifest(data.source, options)
    if cfg.train.global_batch % world_size:
        raise ValueError(f"train.global_batch={cfg.train.global_batch} is not divisible by the world size {world_size}")
    per_rank = cfg.train.global_batch // world_size
    lanes = max(1, data.num_workers)
    features = None
    if cfg.repa.mode == "cached":
        features = load_feature_manifest(cfg.repa.features, options)
        check_feature_set(features, manifest, images_sha256, cfg)
    spec = LoaderSpec(manifest=manifest, root=data.source, image_size=data.image_size, batch=per_rank,
                      seed=cfg.train.seed, split=Split(world_size, rank, lanes, per_rank),
                      window=data.shuffle_window, hflip=data.hflip, options=options, retries=data.retries,
                      skip_failed=data.skip_failed_shards, features=features,
                      features_root=cfg.repa.features)
    return ShardLoader(spec, data.decoder, data.num_workers, device)


def check_feature_set(features: FeatureManifest, images: Manifest, images_sha256: str, cfg):
    """Refuse a feature cache that does not belong to this data, resolution, encoder or flip setting."""
    where = f"repa.features={cfg.repa.features}"
    check_mirrors(features, images, where)
    if features.images_sha256 != images_sha256:
        raise ValueError(f"{where}: computed from another version of {manifest_url(cfg.data.source)} (image "
                         f"manifest sha256 {features.images_sha256[:12]}..., now {images_sha256[:12]}...); "
                         f"rerun `pixeldit repa-cache`")
    tokens = (cfg.data.image_size // cfg.model.arch().patch_size) ** 2
    if features.image_size != cfg.data.image_size or features.tokens != tokens:
        raise ValueError(f"{where}: cached for {features.image_size}px images ({features.tokens} tokens); "
                         f"data.image_size={cfg.data.image_size} needs {tokens} tokens")
    if features.dim != cfg.repa.encoder_dim:
        raise ValueError(f"{where}: {features.dim}-wide features ({features.encoder}), "
                         f"repa.encoder_dim={cfg.repa.encoder_dim}")
    if cfg.data.hflip and features.flip == "none":
        raise ValueError(f"{where}: cached with flip=none but data.hflip=true; recache with --flip both or grid")
