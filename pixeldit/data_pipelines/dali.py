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
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from . import images
from .lanes import LoaderSpec, rank_groups
from .samples import AdmittedSample, admit, drop_undecodable, shard_name, to_batch
from .source import ReadStats

log = logging.getLogger(__name__)
_END = object()


def _reader_thread(spec: LoaderSpec, epoch: int, batches_done: int, out: queue.Queue, stop: threading.Event):
    try:
        for group, stats in rank_groups(spec, epoch, batches_done):
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
    samples: list[AdmittedSample]
    stats: ReadStats
    encoded: list[np.ndarray] = field(init=False)  # what DALI decodes, one uint8 array per sample

    def __post_init__(self):
        self.encoded = [np.frombuffer(s.data, dtype=np.uint8) for s in self.samples]


class Feed:
    """The reader thread's batches on their way into DALI, in order.

    `pending` holds what DALI has taken and not yet returned, empty batches included (they never
    reach DALI, which refuses an empty batch, but keep their place in the order); `refeed` holds
    what a failed pipeline had taken, for the next one to take again.
    """

    def __init__(self, spec: LoaderSpec, epoch: int, batches_done: int, prefetch: int):
        self.spec, self.epoch = spec, epoch
        self.pending: collections.deque[FedBatch] = collections.deque()
        self.refeed: collections.deque[FedBatch] = collections.deque()
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch + 2)
        self.stop = threading.Event()
        self.reader_error: BaseException | None = None  # what the reader raised, unwrapped from DALI's error
        self.reader = threading.Thread(target=_reader_thread, args=(spec, epoch, batches_done, self.queue, self.stop),
                                       daemon=True, name=f"pixeldit-dali-reader-{epoch}")
        self.reader.start()

    def source(self):
        """DALI's external source: the next batch with samples (DALI calls it from the thread that asks
        its iterator for a batch, never concurrently)."""
        while True:
            if self.refeed:
                fed = self.refeed.popleft()
            else:
                item = self.queue.get()
                if item is _END:
                    raise StopIteration
                if isinstance(item, BaseException):
                    self.reader_error = item
                    raise item
                group, stats = item
                fed = FedBatch(admit(self.spec, self.epoch, group, stats), stats)
            self.pending.append(fed)
            if fed.samples:
                return fed.encoded, [np.int32(s.flipped) for s in fed.samples], *_geometry(self.spec, fed)

    def empty_batches(self, device: torch.device) -> Iterator[dict]:
        """The batches at the front of the order that every sample left before DALI."""
        while self.pending and not self.pending[0].samples:
            yield to_batch_of(self.spec, self.pending.popleft(), _no_pixels(self.spec, device))

    def take_back(self) -> FedBatch:
        """The batch a pipeline failed on; the batches it had taken after it go to the next pipeline."""
        fed = self.pending.popleft()
        self.refeed.extendleft(reversed(self.pending))
        self.pending.clear()
        return fed

    def close(self, join_deadline_s: float):
        self.stop.set()
        deadline = time.monotonic() + join_deadline_s
        while self.reader.is_alive() and time.monotonic() < deadline:  # unblock a reader waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self.reader.join(timeout=0.1)
        if self.reader.is_alive():
            log.error("the DALI reader thread %s is still reading epoch %d %.0fs after the epoch stopped "
                      "(a storage read past its deadline?): left behind", self.reader.name, self.epoch,
                      join_deadline_s)


def dali_batches(spec: LoaderSpec, epoch: int, batches_done: int, device: torch.device, prefetch: int = 2,
                 threads: int = 4, join_deadline_s: float = 300.0) -> Iterator[dict]:
    """Batches decoded by DALI. A sample DALI cannot decode fails its whole batch: that batch is then
    decoded on the CPU the pil decoder's way, which skips and counts the bad sample (reason
    `undecodable`) like the pil decoder, and DALI goes on with a new pipeline; a batch the CPU
    decodes completely was not lost to its content, and DALI's error stands."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    feed = Feed(spec, epoch, batches_done, prefetch)

    def start():
        pipe = _build_pipeline(spec, feed.source, device, prefetch, threads)
        return pipe, DALIGenericIterator(pipe, ["image"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                         auto_reset=False, prepare_first_batch=False)

    pipe, iterator = start()
    try:
        while True:
            yield from feed.empty_batches(device)
            try:
                out = next(iterator)
            except StopIteration:
                break
            except RuntimeError as e:
                if feed.reader_error is not None:
                    raise feed.reader_error from None
                yield from feed.empty_batches(device)
                if not feed.pending:
                    raise
                # a pipeline that failed once stops early on a later failure: the batch it failed on is
                # decoded here, and a new pipeline takes the batches the old one had taken, in order
                fed = feed.take_back()
                pixels = _decode_here(spec, fed, device, e)
                del iterator, pipe
                pipe, iterator = start()
                yield to_batch_of(spec, fed, pixels)
                continue
            yield from feed.empty_batches(device)
            yield to_batch_of(spec, feed.pending.popleft(), out[0]["image"].permute(0, 3, 1, 2))
        while feed.pending:
            yield to_batch_of(spec, feed.pending.popleft(), _no_pixels(spec, device))
    finally:
        feed.close(join_deadline_s)
        del iterator, pipe


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


def _decode_here(spec: LoaderSpec, fed: FedBatch, device: torch.device, error: RuntimeError):
    """The batch DALI failed on, decoded on the CPU; the samples that will not decode leave it."""
    size = spec.image_size
    pixels = np.empty((len(fed.samples), size, size, 3), dtype=np.uint8)
    failures = images.decode_batch([s.data for s in fed.samples], pixels, spec.needs_resize(),
                                   [s.flipped for s in fed.samples])
    if not failures:
        shards = sorted({shard_name(spec.manifest, s.raw.canonical) for s in fed.samples})
        raise RuntimeError(f"DALI failed on a batch of {', '.join(shards)} that decodes on the CPU: {error}") from error
    log.warning("DALI could not decode a batch; decoded it on the CPU, skipping %d sample(s)", len(failures))
    fed.samples = drop_undecodable(spec, fed.samples, failures, fed.stats)
    return torch.from_numpy(pixels[:len(fed.samples)]).to(device).permute(0, 3, 1, 2)


def _no_pixels(spec: LoaderSpec, device: torch.device) -> torch.Tensor:
    size = spec.image_size
    return torch.empty((0, size, size, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)


def to_batch_of(spec: LoaderSpec, fed: FedBatch, image: torch.Tensor) -> dict:
    return to_batch(spec, fed.samples, image, fed.stats)


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone: PIL parses it lazily without decoding pixels."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        return img.size
