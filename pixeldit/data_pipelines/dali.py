"""The DALI decoder: the shared sample source feeds encoded bytes, DALI decodes and transforms.

Order, splitting, retries and resume stay in source.py, so both decoders see
the same keys in the same order. A reader thread fills a small queue with the
next batches' bytes (I/O releases the GIL); DALI's external_source pulls from
it, and a FIFO pairs each DALI output with its labels and keys (DALI returns
batches in the order its source produced them). Samples are admitted as the pil
decoder admits them (labels, truncation, missing images: skipped and counted
before DALI sees them); a batch left empty stays out of DALI, which refuses
empty batches, and a batch DALI fails to decode is decoded on the CPU instead.
"""

from __future__ import annotations

import collections
import io
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from . import images
from .loader import LoaderSpec, admit, flip_coin, lane_batches, sample_target, shard_name, skip, stack_targets
from .source import ReadStats, interleave, lane_position

log = logging.getLogger(__name__)
_END = object()


def _reader_thread(spec: LoaderSpec, epoch: int, batches_done: int, out: queue.Queue, stop: threading.Event):
    lanes = spec.split.lanes
    try:
        groups = interleave([lane_batches(spec, epoch, lane, lane_position(batches_done, lanes, lane), decode=False)
                             for lane in range(lanes)], start=batches_done % lanes)
        for group, stats in groups:
            if stop.is_set():
                return
            out.put((group, stats))
        out.put(_END)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
        out.put(e)


def _build_pipeline(spec: LoaderSpec, source, device: torch.device, prefetch: int, threads: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"

    @pipeline_def(batch_size=spec.batch, num_threads=threads, device_id=device.index or 0 if gpu else None,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipeline():
        encoded, flips, resized_hw, anchor_yx = fn.external_source(
            source=source, num_outputs=4, batch=True, dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT],
            ndim=[1, 0, 1, 1])
        decoded = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if spec.needs_resize():
            # one antialiased bicubic pass onto ADM's exact output grid (sizes and crop offsets come
            # from the source, read off the image headers); only the filter differs (docs/data.md)
            decoded = fn.resize(decoded, size=resized_hw, interp_type=types.INTERP_CUBIC, antialias=True)
            decoded = fn.slice(decoded, anchor_yx, [float(spec.image_size)] * 2, axes=[0, 1],
                               normalized_anchor=False, normalized_shape=False)
        # HWC out, viewed as (B, 3, H, W) channels-last on the torch side, as the pil decoder does:
        # a transpose here would cost a full copy per image
        return fn.flip(decoded, horizontal=flips)

    pipe = pipeline()
    pipe.build()
    return pipe


@dataclass
class FedBatch:
    """A batch whose samples went to DALI (or, with none left, stays out of it), awaiting its pixels."""
    encoded: list       # what DALI decodes, one uint8 array per sample
    flips: list
    labels: list[int]
    keys: list[str]
    indices: list[int]
    stats: ReadStats
    targets: list
    raws: list          # the samples, to name them if the batch has to be decoded here


def dali_batches(spec: LoaderSpec, epoch: int, batches_done: int, device: torch.device, prefetch: int = 2,
                 threads: int = 4, join_deadline_s: float = 300.0) -> Iterator[dict]:
    """Batches decoded by DALI. A sample DALI cannot decode fails its whole batch: that batch is then
    decoded on the CPU the pil decoder's way, which skips and counts the bad sample (reason
    `undecodable`) like the pil decoder, and DALI goes on with a new pipeline; a batch the CPU
    decodes completely was not lost to its content, and DALI's error stands."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    pending: collections.deque[FedBatch] = collections.deque()  # in feed order, empty ones included
    refeed: collections.deque[FedBatch] = collections.deque()   # taken by a pipeline that failed
    feed: queue.Queue = queue.Queue(maxsize=prefetch + 2)
    stop = threading.Event()
    reader = threading.Thread(target=_reader_thread, args=(spec, epoch, batches_done, feed, stop), daemon=True,
                              name=f"pixeldit-dali-reader-{epoch}")
    reader.start()
    source_error: list[BaseException] = []  # what the reader raised, unwrapped from DALI's error

    # DALI calls this from the thread that asks its iterator for a batch (never concurrently)
    def source():
        while True:
            if refeed:
                fed = refeed.popleft()
            else:
                item = feed.get()
                if item is _END:
                    raise StopIteration
                if isinstance(item, BaseException):
                    source_error.append(item)
                    raise item
                fed = _admit_batch(spec, epoch, *item)
            pending.append(fed)
            if fed.encoded:  # DALI refuses an empty batch: one with every sample skipped stays out of it
                return fed.encoded, fed.flips, *_geometry(spec, fed)

    def start():
        pipe = _build_pipeline(spec, source, device, prefetch, threads)
        return pipe, DALIGenericIterator(pipe, ["image"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                         auto_reset=False, prepare_first_batch=False)

    pipe, iterator = start()
    try:
        while True:
            while pending and not pending[0].encoded:
                yield _to_batch(spec, pending.popleft(), _no_pixels(spec, device))
            try:
                out = next(iterator)
            except StopIteration:
                break
            except RuntimeError as e:
                if source_error:
                    raise source_error[0] from None
                while pending and not pending[0].encoded:
                    yield _to_batch(spec, pending.popleft(), _no_pixels(spec, device))
                if not pending:
                    raise
                # a pipeline that failed once stops early on a later failure: the batch it failed on is
                # decoded here, and a new pipeline takes the batches the old one had taken, in order
                fed = pending.popleft()
                pixels = _decode_here(spec, epoch, fed, device, e)
                refeed.extendleft(reversed(pending))
                pending.clear()
                del iterator, pipe
                pipe, iterator = start()
                yield _to_batch(spec, fed, pixels)
                continue
            while not pending[0].encoded:
                yield _to_batch(spec, pending.popleft(), _no_pixels(spec, device))
            yield _to_batch(spec, pending.popleft(), out[0]["image"].permute(0, 3, 1, 2))
        while pending:
            yield _to_batch(spec, pending.popleft(), _no_pixels(spec, device))
    finally:
        stop.set()
        deadline = time.monotonic() + join_deadline_s
        while reader.is_alive() and time.monotonic() < deadline:  # unblock a reader waiting on a full queue
            try:
                feed.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.1)
        if reader.is_alive():
            log.error("the DALI reader thread %s is still reading epoch %d %.0fs after the epoch stopped "
                      "(a storage read past its deadline?): left behind", reader.name, epoch, join_deadline_s)
        del iterator, pipe


def _admit_batch(spec: LoaderSpec, epoch: int, group: list, stats: ReadStats) -> FedBatch:
    fed = FedBatch([], [], [], [], [], stats, [], [])
    for raw in group:
        admitted = admit(spec, raw, stats)
        if admitted is None:
            continue
        data, label = admitted
        flipped = spec.hflip and flip_coin(spec.seed, epoch, raw.canonical)
        fed.encoded.append(np.frombuffer(data, dtype=np.uint8))
        fed.flips.append(np.int32(flipped))
        if spec.features is not None:
            fed.targets.append(sample_target(spec, raw, flipped))
        fed.labels.append(label)
        fed.keys.append(raw.key)
        fed.indices.append(raw.canonical)
        fed.raws.append(raw)
    return fed


def _geometry(spec: LoaderSpec, fed: FedBatch) -> tuple[list, list]:
    """Per sample: the size DALI resizes to and the crop's anchor (ADM's grid, read off the headers)."""
    sizes, anchors = [], []
    for data in fed.encoded:
        if spec.needs_resize():
            try:
                width_height = image_size_of(data)
            except (OSError, ValueError, SyntaxError):  # Pillow's ways of saying a header is bad
                width_height = (spec.image_size, spec.image_size)  # DALI fails on it: the CPU decode skips it
            (w, h), (left, top) = images.adm_geometry(*width_height, spec.image_size)
        else:
            (w, h), (left, top) = (spec.image_size, spec.image_size), (0, 0)
        sizes.append(np.array([h, w], dtype=np.float32))
        anchors.append(np.array([top, left], dtype=np.float32))
    return sizes, anchors


def _decode_here(spec: LoaderSpec, epoch: int, fed: FedBatch, device: torch.device, error: RuntimeError):
    """The batch DALI failed on, decoded on the CPU; the samples that will not decode leave it."""
    size = spec.image_size
    pixels = np.empty((len(fed.encoded), size, size, 3), dtype=np.uint8)
    failures = images.decode_batch([e.tobytes() for e in fed.encoded], pixels, spec.needs_resize(),
                                   [bool(f) for f in fed.flips])
    if not failures:
        raise RuntimeError(f"DALI failed on a batch of {', '.join(sorted({_shard_of(spec, i) for i in fed.indices}))} "
                           f"that decodes on the CPU: {error}") from error
    log.warning("DALI could not decode a batch; decoded it on the CPU, skipping %d sample(s)", len(failures))
    for i in sorted(failures, reverse=True):
        skip(fed.stats, spec, fed.raws[i], "undecodable", failures[i])
        for column in (fed.labels, fed.keys, fed.indices, fed.raws):
            del column[i]
        if fed.targets:
            del fed.targets[i]
    return torch.from_numpy(pixels[:len(fed.keys)]).to(device).permute(0, 3, 1, 2)


def _no_pixels(spec: LoaderSpec, device: torch.device) -> torch.Tensor:
    size = spec.image_size
    return torch.empty((0, size, size, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)


def _to_batch(spec: LoaderSpec, fed: FedBatch, image: torch.Tensor) -> dict:
    batch = {"image": image, "label": torch.tensor(fed.labels, dtype=torch.int64), "key": fed.keys,
             "index": torch.tensor(fed.indices, dtype=torch.int64), "stats": fed.stats}
    if spec.features is not None:
        batch["repa"] = stack_targets(spec, fed.targets)
    return batch


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone: PIL parses it lazily without decoding pixels."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _shard_of(spec: LoaderSpec, canonical: int) -> str:
    return shard_name(spec.manifest, canonical)
