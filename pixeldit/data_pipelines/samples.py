"""The per-sample record both decoders build: which samples of a batch are worth decoding (bytes,
label, flip), which are skipped and why, and the batch dict made of the ones that decoded.

The pil decoder (loader.py) and the DALI decoder (dali.py) differ only in how the admitted
bytes become pixels; everything a sample carries besides its pixels is decided here, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..diffusion.randomness import stream_seed
from . import images
from .features import decode as decode_features
from .features import repa_files
from .index_shards import label_from
from .lanes import LoaderSpec
from .manifest import Manifest
from .source import RawSample, ReadStats
from .tario import DamagedSample

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def image_bytes(files: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            return files[ext]
    return None


def decode_image(data: bytes, size: int, crop: bool) -> torch.Tensor:
    """(3, S, S) uint8 (a view of pixel-order memory), for callers that decode one image at a time."""
    out = np.empty((size, size, 3), dtype=np.uint8)
    images.decode_into(data, out, crop)
    return torch.from_numpy(out).permute(2, 0, 1)


def flip_coin(seed: int, epoch: int, canonical: int) -> bool:
    """Per-sample flip decision, decoder-independent: both decoders flip the same images."""
    return bool(stream_seed(seed, 13, epoch, canonical) & 1)


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


# (root, shard) warned about once in this process: a cut shard skips every sample after the cut, every epoch
_truncated_shards: set[tuple[str, str]] = set()


def skip(stats: ReadStats, spec: LoaderSpec, raw: RawSample, reason: str, detail: str):
    shard = shard_name(spec.manifest, raw.canonical)
    stats.skip(reason, shard, raw.key, detail)
    if reason != "truncated":
        log.warning("skipping sample %r of %s (%s): %s", raw.key, shard, reason, detail)
    elif (spec.root, shard) not in _truncated_shards:  # two threads may both warn once: harmless
        _truncated_shards.add((spec.root, shard))
        log.warning("skipping sample %r of %s (truncated): %s; the shard's other samples after the cut are "
                    "skipped and counted without a warning (data/skipped/truncated, skipped.jsonl)",
                    raw.key, shard, detail)


@dataclass
class AdmittedSample:
    """A sample worth decoding: its encoded image, its class and whether it is flipped."""
    raw: RawSample
    data: bytes
    label: int
    flipped: bool


def admit_one(spec: LoaderSpec, epoch: int, raw: RawSample) -> AdmittedSample:
    if isinstance(raw.files, DamagedSample):
        raise Unusable(raw.files.reason, raw.files.detail)
    data = image_bytes(raw.files)
    if data is None:
        raise Unusable("no_image", f"no image among {sorted(raw.files)}")
    label = label_of(raw.files, spec.manifest)
    return AdmittedSample(raw, data, label, spec.hflip and flip_coin(spec.seed, epoch, raw.canonical))


def admit(spec: LoaderSpec, epoch: int, group: list[RawSample], stats: ReadStats) -> list[AdmittedSample]:
    """The group's samples worth decoding, in order; anything else is skipped and counted here."""
    admitted = []
    for raw in group:
        try:
            admitted.append(admit_one(spec, epoch, raw))
        except Unusable as e:
            skip(stats, spec, raw, e.reason, e.detail)
    return admitted


def drop_undecodable(spec: LoaderSpec, samples: list[AdmittedSample], failures: dict[int, str],
                     stats: ReadStats) -> list[AdmittedSample]:
    """`samples` without those whose image did not decode (by index, with why), which are skipped."""
    for i in sorted(failures):
        skip(stats, spec, samples[i].raw, "undecodable", failures[i])
    return [s for i, s in enumerate(samples) if i not in failures]


def to_batch(spec: LoaderSpec, samples: list[AdmittedSample], image: torch.Tensor, stats: ReadStats) -> dict:
    """The batch {image, label, key, index, stats[, repa]} of `samples`, whose pixels are `image`'s rows."""
    batch = {"image": image, "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
             "key": [s.raw.key for s in samples],
             "index": torch.tensor([s.raw.canonical for s in samples], dtype=torch.int64), "stats": stats}
    if spec.features is not None:
        batch["repa"] = stack_targets(spec, [sample_target(spec, s) for s in samples])
    return batch


def sample_target(spec: LoaderSpec, sample: AdmittedSample) -> torch.Tensor:
    where = f"{spec.features_root} (sample {sample.raw.key!r})"
    return decode_features(repa_files(sample.raw.files), spec.features, sample.flipped, where)


def stack_targets(spec: LoaderSpec, targets: list[torch.Tensor]) -> torch.Tensor:
    f = spec.features
    dtype = torch.bfloat16 if f.dtype == "bf16" else torch.float16
    return torch.stack(targets) if targets else torch.empty(0, f.tokens, f.dim, dtype=dtype)
