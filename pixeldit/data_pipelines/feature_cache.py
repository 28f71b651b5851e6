"""A REPA feature cache being written: per-shard records (resume per shard), the per-sample image
decode and feature files, and the manifest once every shard is done (`pixeldit repa-cache`,
jobs/repa_cache.py, runs the encoder between them).

Image shard i → feature shard i with the same name, keys and order. A finished shard leaves a
record under `<out>/parts/`; a rerun skips recorded shards and refuses records written with other
settings. An image that does not decode gets zero features and is listed in the manifest (the
loader skips that image anyway, so they are never used).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import torch

from ..errors import DataError
from ..storage import exists, filesystem, join, read_bytes, strip_protocol, write_bytes
from .features import FeatureManifest, encode, save_feature_manifest
from .manifest import Manifest, ShardInfo
from .samples import decode_image, image_bytes

log = logging.getLogger(__name__)
PARTS = "parts"


def record_url(out: str, shard_name: str) -> str:
    return join(out, PARTS, shard_name.rsplit(".", 1)[0] + ".json")


def recorded(out: str, shard_name: str, settings: dict, options) -> bool:
    """Whether the shard is done; a record written with other settings is refused."""
    url = record_url(out, shard_name)
    if not exists(url, options):
        return False
    record = json.loads(read_bytes(url, options))
    if record["settings"] != settings:
        changed = sorted(k for k in settings if record["settings"].get(k) != settings[k])
        raise DataError(f"{url}: written with other settings ({', '.join(changed)}); use the same ones to "
                        f"resume, or write to another --out")
    return True


def write_record(out: str, shard_name: str, settings: dict, info: ShardInfo, unreadable: list[str], options):
    record = {"settings": settings, "shard": asdict(info), "unreadable": unreadable}
    write_bytes(record_url(out, shard_name), json.dumps(record).encode(), options)


def decode_sample(item, size: int, crop: bool) -> torch.Tensor | None:
    """(3, S, S) uint8 of a (member, key, files) item, or None (logged) when it has no decodable image."""
    _, key, files = item
    try:
        data = image_bytes(files)
        if data is None:
            raise DataError(f"no image among {sorted(files)}")
        return decode_image(data, size, crop)
    except Exception as e:  # noqa: BLE001 - the sample keeps its slot with zero features
        log.warning("sample %r does not decode (%s: %s); its features are zeros", key, type(e).__name__, e)
        return None


def tokens_to_files(tokens: tuple, dtype: str, flip: str) -> dict[str, bytes]:
    """A sample's feature files from its (plain, mirrored or None) tokens."""
    plain, mirrored = tokens
    files = encode(plain, dtype)
    if flip == "both":
        files |= encode(plain if mirrored is None else mirrored, dtype, suffix="_flip")
    return files


def finish_manifest(out: str, images: Manifest, encoder: dict, settings: dict, options) -> FeatureManifest | None:
    """Write the manifest when every shard is recorded (and drop the records); None while one is not.

    `encoder`: the FeatureManifest's encoder fields (encoder, weights, weights_sha256, image_size,
    input_size, tokens, dim).
    """
    shards, unreadable = [], []
    for shard in images.shards:
        url = record_url(out, shard.name)
        if not exists(url, options):
            log.warning("%s is not finished yet; the manifest is written when every shard is", shard.name)
            return None
        record = json.loads(read_bytes(url, options))
        shards.append(ShardInfo(**record["shard"]))
        unreadable += record["unreadable"]
    manifest = FeatureManifest(shards=shards, **encoder, dtype=settings["dtype"], flip=settings["flip"],
                               images_sha256=settings["images_sha256"], unreadable=unreadable)
    save_feature_manifest(out, manifest, options)
    fs = filesystem(out, options)
    fs.rm(strip_protocol(join(out, PARTS)), recursive=True)
    return manifest
