"""The DALI decoder: the shared sample source feeds encoded bytes, DALI decodes and transforms.

Order, splitting, retries and resume stay in source.py, so both decoders see
the same keys in the same order. A reader thread fills a small queue with the
next batches' bytes (I/O releases the GIL); DALI's external_source pulls from
it, and a FIFO pairs each DALI output with its labels and keys (DALI returns
batches in the order its source produced them).
"""

from __future__ import annotations

import collections
import io
import queue
import threading
from typing import Iterator

import numpy as np
import torch

from . import images
from .loader import LoaderSpec, flip_coin, image_bytes, label_of, lane_batches, sample_target, stack_targets
from .source import EpochPlan, interleave, lane_position

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


def dali_batches(spec: LoaderSpec, epoch: int, batches_done: int, device: torch.device, prefetch: int = 2,
                 threads: int = 4) -> Iterator[dict]:
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    plan = EpochPlan(spec.manifest, spec.seed, epoch, spec.split)
    pending: collections.deque = collections.deque()
    feed: queue.Queue = queue.Queue(maxsize=prefetch + 2)
    stop = threading.Event()
    reader = threading.Thread(target=_reader_thread, args=(spec, epoch, batches_done, feed, stop), daemon=True)
    reader.start()

    def source():
        item = feed.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        group, stats = item
        present = [raw for raw in group if raw is not None]
        encoded, flips, sizes, anchors, labels, keys, indices, targets = [], [], [], [], [], [], [], []
        for raw in present:
            data = image_bytes(raw.files)
            if data is None:
                raise ValueError(f"{_shard_of(plan, raw.canonical)}: sample {raw.key!r} has no image")
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            if spec.needs_resize():
                try:
                    width_height = image_size_of(data)
                except Exception as e:  # noqa: BLE001 - named below
                    raise RuntimeError(f"{_shard_of(plan, raw.canonical)}: sample {raw.key!r} is not a readable "
                                       f"image ({e}); DALI cannot skip it: run `pixeldit shards verify --decode` "
                                       f"or use data.decoder=pil, which skips and counts it") from e
                (w, h), (left, top) = images.adm_geometry(*width_height, spec.image_size)
            else:
                (w, h), (left, top) = (spec.image_size, spec.image_size), (0, 0)
            sizes.append(np.array([h, w], dtype=np.float32))
            anchors.append(np.array([top, left], dtype=np.float32))
            flipped = spec.hflip and flip_coin(spec.seed, epoch, raw.canonical)
            flips.append(np.int32(flipped))
            if spec.features is not None:
                targets.append(sample_target(spec, raw, flipped))
            labels.append(label_of(raw.files, raw.key))
            keys.append(raw.key)
            indices.append(raw.canonical)
        pending.append((labels, keys, indices, stats, sorted({_shard_of(plan, i) for i in indices}), targets))
        return encoded, flips, sizes, anchors

    pipe = _build_pipeline(spec, source, device, prefetch, threads)
    iterator = DALIGenericIterator(pipe, ["image"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
                                   prepare_first_batch=False)
    try:
        while True:
            try:
                out = next(iterator)
            except StopIteration:
                return
            except RuntimeError as e:
                if "shards verify" in str(e):
                    raise
                shards = pending[0][4] if pending else []
                raise RuntimeError(f"DALI failed to decode a batch from {', '.join(shards) or 'unknown shards'}; "
                                   f"DALI cannot skip bad samples: run `pixeldit shards verify --decode` on them "
                                   f"or use data.decoder=pil, which skips and counts them. ({e})") from e
            labels, keys, indices, stats, _, targets = pending.popleft()
            batch = {"image": out[0]["image"].permute(0, 3, 1, 2), "label": torch.tensor(labels, dtype=torch.int64),
                     "key": keys, "index": torch.tensor(indices, dtype=torch.int64), "stats": stats.as_dict()}
            if spec.features is not None:
                batch["repa"] = stack_targets(spec, targets)
            yield batch
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue, then let it finish
            try:
                feed.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.1)
        del iterator, pipe


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone: PIL parses it lazily without decoding pixels."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _shard_of(plan: EpochPlan, canonical: int) -> str:
    return plan.manifest.shards[plan.locate(canonical)[0]].name
