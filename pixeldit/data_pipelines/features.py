"""REPA feature shards: their manifest, the per-sample encoding, and lockstep reading.

A feature set mirrors an image shard set one to one: shard i holds the same
keys in the same order, so the sample source reads both with the same plan and
the same offsets (`LockstepReader`). Each sample stores raw little-endian
bytes of its (T, C) tokens — `feat` (fp16 / bf16 / int8) plus, for int8, a
per-token fp32 `scale` — and, with flip policy `both`, `feat_flip` /
`scale_flip` for the mirrored image. T and C live in the manifest, so a sample
costs no header.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from ..errors import ConfigError, DataError, MissingFileError
from .manifest import ShardInfo, manifest_url, parse_manifest_json
from .source import ReadStats, ShardReader
from ..storage import read_bytes, write_bytes
from .tario import DamagedSample

FORMAT = "pixeldit-repa-features"
VERSION = 1
DTYPES = ("fp16", "bf16", "int8")
FLIPS = ("none", "both", "grid")
_ITEMSIZE = {"fp16": 2, "bf16": 2, "int8": 1}


@dataclass
class FeatureManifest:
    shards: list[ShardInfo]
    encoder: str              # e.g. dinov2_vitb14
    weights: str              # where the weights came from (file or URL)
    weights_sha256: str       # content hash of the weights (names, shapes, values)
    image_size: int           # training resolution the targets belong to
    input_size: int           # encoder input (14 · image_size / 16)
    tokens: int
    dim: int
    dtype: str
    flip: str
    images_sha256: str        # sha256 of the image manifest the features were computed from
    unreadable: list[str] = field(default_factory=list)  # keys whose image did not decode (zero features)
    format: str = FORMAT
    version: int = VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def sample_bytes(self) -> int:
        """Bytes of one image's features as stored (both orientations with flip=both)."""
        one = self.tokens * self.dim * _ITEMSIZE[self.dtype] + (self.tokens * 4 if self.dtype == "int8" else 0)
        return one * (2 if self.flip == "both" else 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"num_samples": self.num_samples}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "FeatureManifest":
        data = parse_manifest_json(text, where, FORMAT, VERSION)
        try:
            manifest = cls(**data)
        except TypeError as e:
            raise DataError(f"{where}: malformed feature manifest: {e}") from None
        if manifest.dtype not in DTYPES or manifest.flip not in FLIPS:
            raise DataError(f"{where}: dtype {manifest.dtype!r} / flip {manifest.flip!r} unknown")
        return manifest


def load_feature_manifest(root: str, options: dict | None = None) -> FeatureManifest:
    url = manifest_url(root)
    try:
        text = read_bytes(url, options).decode()
    except FileNotFoundError:
        raise MissingFileError(f"no feature manifest at {url} (write one with `pixeldit repa-cache`)") from None
    return FeatureManifest.from_json(text, url)


def save_feature_manifest(root: str, manifest: FeatureManifest, options: dict | None = None):
    write_bytes(manifest_url(root), manifest.to_json().encode(), options)


def check_mirrors(features: FeatureManifest, images, where: str):
    """The feature set must have the image set's shards with the same sample counts."""
    if len(features.shards) != len(images.shards):
        raise DataError(f"{where}: {len(features.shards)} feature shards for {len(images.shards)} image shards")
    for f, i in zip(features.shards, images.shards):
        if f.name != i.name or f.samples != i.samples:
            raise DataError(f"{where}: feature shard {f.name} ({f.samples} samples) does not mirror image shard "
                             f"{i.name} ({i.samples} samples)")


# ---------------------------------------------------------------- one sample

def encode(tokens: torch.Tensor, dtype: str, suffix: str = "") -> dict[str, bytes]:
    """(T, C) float tokens → the sample's members in the stored dtype."""
    x = tokens.detach().float().cpu()
    if dtype == "fp16":
        return {"feat" + suffix: x.half().numpy().tobytes()}
    if dtype == "bf16":
        return {"feat" + suffix: x.bfloat16().view(torch.int16).numpy().tobytes()}
    if dtype == "int8":
        # per-token symmetric scale: DINOv2 token norms vary a lot across tokens, one scale per
        # token keeps every token at full 8-bit resolution
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
        return {"feat" + suffix: q.numpy().tobytes(), "scale" + suffix: scale.squeeze(1).numpy().tobytes()}
    raise ConfigError(f"feature dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def decode(files: dict[str, bytes], manifest: FeatureManifest, flipped: bool, where: str) -> torch.Tensor:
    """The sample's (T, C) target in fp16 / bf16 (int8 is dequantised to fp16), mirrored if `flipped`."""
    T, C, dtype = manifest.tokens, manifest.dim, manifest.dtype
    suffix = "_flip" if flipped and manifest.flip == "both" else ""
    if flipped and manifest.flip == "none":
        raise DataError(f"{where}: features were cached with flip=none; flipped images need flip=both or grid")
    data = files.get("feat" + suffix)
    expected = T * C * _ITEMSIZE[dtype]
    if data is None or len(data) != expected:
        got = "no feat" + suffix if data is None else f"{len(data)} bytes"
        raise DataError(f"{where}: feature has {got}, expected {expected} bytes ({T} x {C} {dtype})")
    if dtype == "fp16":
        x = torch.frombuffer(bytearray(data), dtype=torch.float16)
    elif dtype == "bf16":
        x = torch.frombuffer(bytearray(data), dtype=torch.int16).view(torch.bfloat16)
    else:
        scale = files.get("scale" + suffix)
        if scale is None or len(scale) != 4 * T:
            raise DataError(f"{where}: int8 feature without a {T}-token scale")
        q = torch.frombuffer(bytearray(data), dtype=torch.int8).view(T, C)
        x = (q.float() * torch.frombuffer(bytearray(scale), dtype=torch.float32)[:, None]).half()
    x = x.view(T, C)
    if flipped and manifest.flip == "grid":
        x = mirror_grid(x)
    return x


def mirror_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Mirror a row-major (g·g, C) token grid left-right: an approximation of the flipped image's features."""
    g = math.isqrt(tokens.shape[0])
    return tokens.view(g, g, -1).flip(1).reshape(tokens.shape)


# ---------------------------------------------------------------- lockstep reading

class LockstepReader:
    """Reads image and feature shards together; a sample's files gain `repa.*` members.

    Both sets share shard names, counts and order, so the runs the plan asks for
    are the same byte-independent member ranges in each. A key that differs is an
    error naming both shards: features that belong to other images must never
    train silently.
    """

    def __init__(self, images: ShardReader, features: ShardReader):
        self.images, self.features = images, features
        self.stats = ReadStats()

    @property
    def stats(self) -> ReadStats:
        return self.images.stats

    @stats.setter
    def stats(self, value: ReadStats):
        self.images.stats = self.features.stats = value

    def read_run(self, shard: int, first: int, stop: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        image_run = self.images.read_run(shard, first, stop)
        feature_run = self.features.read_run(shard, first, stop)
        for (member, key, files), (f_member, f_key, f_files) in zip(image_run, feature_run):
            if (member, key) != (f_member, f_key):
                raise DataError(f"{self.features.url(shard)}: sample {f_member} has key {f_key!r}, but "
                                 f"{self.images.url(shard)} has {key!r} there: the features do not mirror the images")
            if isinstance(f_files, DamagedSample) and not isinstance(files, DamagedSample):
                files = f_files  # its features were cut off or damaged: the sample cannot train, skipped
            else:
                files.update({"repa." + ext: data for ext, data in f_files.items()})
            yield member, key, files


def repa_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {ext[len("repa."):]: data for ext, data in files.items() if ext.startswith("repa.")}

