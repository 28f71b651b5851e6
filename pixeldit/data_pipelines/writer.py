"""`pixeldit shards write`: source images -> validated WebDataset shards + manifest + DALI indexes.

Every image is decoded once while writing, so a shard set that was written is
known to decode; what would not decode is skipped and listed in the manifest.
Shards stream straight to the destination (a local folder or any fsspec URL).
A rerun after a crash keeps finished shards (recorded in `manifest.partial.json`
after each one) and rewrites only the unfinished one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError, DataError, MissingFileError
from . import images, synthetic
from .manifest import ImagePolicy, Manifest, ShardInfo, save_manifest
from ..storage import filesystem, join, protocol_of, read_bytes, strip_protocol, write_bytes
from .tario import ShardWriter

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PARTIAL = "manifest.partial.json"


@dataclass(frozen=True)
class SourceItem:
    ref: str     # a path or URL, or "synthetic:<index>:<size>:<seed>"
    label: int
    key: str


def _key_from(name: str) -> str:
    stem = name.rsplit("/", 1)[-1]
    stem = stem.split(".", 1)[0] if "." in stem else stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "sample"


def _unique_keys(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        key = _key_from(name)
        if key in seen:
            seen[key] += 1
            key = f"{key}-{seen[key]}"
        else:
            seen[key] = 0
        keys.append(key)
    return keys


def list_image_folder(root: str) -> tuple[list[SourceItem], list[str]]:
    """An ImageNet-style folder: one subfolder per class, classes indexed in sorted order."""
    path = Path(root)
    if not path.is_dir():
        raise MissingFileError(f"source folder not found: {root}")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class subfolders")
    refs, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                refs.append(str(f))
                labels.append(label)
    keys = _unique_keys(refs)
    return [SourceItem(r, lab, k) for r, lab, k in zip(refs, labels, keys)], classes


def list_file_list(list_path: str) -> tuple[list[SourceItem], list[str]]:
    """Lines of `path label` (label an integer); relative paths are relative to the list file."""
    base = os.path.dirname(os.path.abspath(list_path))
    refs, labels = [], []
    for n, line in enumerate(Path(list_path).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_path}:{n}: expected 'path label', got {line!r}")
        ref = parts[0] if "://" in parts[0] or os.path.isabs(parts[0]) else os.path.join(base, parts[0])
        refs.append(ref)
        labels.append(int(parts[1]))
    if not refs:
        raise DataError(f"{list_path}: no entries")
    if min(labels) < 0:
        raise DataError(f"{list_path}: negative label {min(labels)}")
    classes = [str(i) for i in range(max(labels) + 1)]
    return [SourceItem(r, lab, k) for r, lab, k in zip(refs, labels, _unique_keys(refs))], classes


def synthetic_items(num_classes: int, per_class: int, size: int, seed: int) -> tuple[list[SourceItem], list[str]]:
    if not 1 <= num_classes <= len(synthetic.CLASSES):
        raise ConfigError(f"synthetic data has 1..{len(synthetic.CLASSES)} classes, asked for {num_classes}")
    items = [SourceItem(f"synthetic:{i}:{size}:{seed}", i % num_classes, f"synth{i:07d}")
             for i in range(num_classes * per_class)]
    return items, synthetic.CLASSES[:num_classes]


# ---------------------------------------------------------------- per-item work (in pool workers)

def prepare_item(item: SourceItem, policy: ImagePolicy) -> tuple[SourceItem, dict | None, str | None]:
    """(item, {ext: bytes} or None, skip reason or None). Never raises for bad image data."""
    try:
        if item.ref.startswith("synthetic:"):
            _, index, size, seed = item.ref.split(":")
            img = synthetic.render(int(index), item.label, int(size), int(seed))
            raw, original_format = None, None
        else:
            raw = read_bytes(item.ref)
            img = images.decode_rgb(raw)
            original_format = _format_of(raw)
    except FileNotFoundError as e:
        return item, None, f"missing: {e}"
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip and list it"
        return item, None, images.failure_text(e)
    if policy.mode == "adm":
        data, ext = images.encode(images.adm_center_crop(img, policy.size), policy.format, policy.quality), policy.format
    elif raw is not None and original_format is not None and _is_rgb(raw):
        data, ext = raw, original_format  # keep the photographer's bytes: no second lossy pass
    else:
        data, ext = images.encode(img, policy.format, policy.quality), policy.format
    return item, {ext: data, "cls": str(item.label).encode()}, None


def _format_of(raw: bytes) -> str | None:
    if raw[:3] == b"\xff\xd8\xff":
        return "jpg"
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    return None


def _is_rgb(raw: bytes) -> bool:
    from PIL import Image
    with Image.open(io.BytesIO(raw)) as img:
        return img.mode == "RGB"


def _prepare_star(args):
    return prepare_item(*args)


# ---------------------------------------------------------------- the writer

def _params_fingerprint(items: list[SourceItem], policy: ImagePolicy, seed: int, shard_samples, shard_bytes,
                        prefix: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([asdict(policy), seed, shard_samples, shard_bytes, prefix]).encode())
    for item in items:
        h.update(f"{item.ref}\t{item.label}\n".encode())
    return h.hexdigest()


def write_shards(items: list[SourceItem], classes: list[str], dst: str, *, policy: ImagePolicy | None = None,
                 shard_samples: int | None = None, shard_bytes: int | None = None, workers: int = 0,
                 seed: int = 0, prefix: str = "train", source: str = "", options: dict | None = None,
                 progress: bool = True) -> Manifest:
    policy = _checked_policy(policy or ImagePolicy())
    if not shard_samples and not shard_bytes:
        shard_samples = 1000
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[i] for i in order]
    fingerprint = _params_fingerprint(items, policy, seed, shard_samples, shard_bytes, prefix)

    fs = filesystem(dst, options)
    fs.makedirs(strip_protocol(dst), exist_ok=True)
    shards, skipped, consumed = _resume_state(dst, options, fingerprint)
    if shards:
        log.info("%s: resuming after %d finished shards (%d source items)", dst, len(shards), consumed)

    def save_partial(consumed: int):
        _save_partial(dst, options, shards, skipped, consumed, fingerprint, classes, policy, seed, source)

    jobs = ((item, policy) for item in items[consumed:])
    pool = mp.get_context("spawn").Pool(workers) if workers > 0 else None
    results = pool.imap(_prepare_star, jobs, chunksize=8) if pool else map(_prepare_star, jobs)
    bar = tqdm(total=len(items), initial=consumed, unit="img", desc="writing shards", disable=not progress,
               smoothing=0.05)
    try:
        _write_prepared(results, dst, prefix, options, (shard_samples, shard_bytes), shards, skipped, consumed,
                        save_partial, bar.update)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    manifest = Manifest(shards=shards, classes=list(classes), image=policy, skipped=skipped, seed=seed, source=source)
    save_manifest(dst, manifest, options)
    if fs.exists(strip_protocol(join(dst, PARTIAL))):
        fs.rm(strip_protocol(join(dst, PARTIAL)))
    return manifest


def _checked_policy(policy: ImagePolicy) -> ImagePolicy:
    if policy.mode not in ("original", "adm"):
        raise ConfigError(f"image policy {policy.mode!r}: expected 'original' or 'adm'")
    if policy.mode == "adm" and not policy.size:
        raise ConfigError("the adm crop needs a size (--size)")
    if policy.format not in images.FORMATS:
        raise ConfigError(f"image format {policy.format!r}: expected one of {sorted(images.FORMATS)}")
    return policy


def _write_prepared(results, dst: str, prefix: str, options: dict | None, limits: tuple, shards: list,
                    skipped: list, consumed: int, save_partial, advance):
    """Append the prepared items to shards (a shard ends at `limits` = (samples, bytes)); the unusable
    ones go to `skipped`. After each finished shard `save_partial(consumed)` records the progress."""
    shard_samples, shard_bytes = limits
    current: OpenShard | None = None
    try:
        for item, files, reason in results:
            consumed += 1
            advance(1)
            if files is None:
                skipped.append({"path": item.ref, "reason": reason})
                log.warning("skipping %s: %s", item.ref, reason)
            else:
                if current is None:
                    current = OpenShard(dst, f"{prefix}-{len(shards):06d}", options)
                current.writer.add(item.key, files)
            full = current is not None and (
                (shard_samples and len(current.writer.entries) >= shard_samples)
                or (shard_bytes and current.writer.bytes_written >= shard_bytes))
            if full:
                shards.append(current.finish())
                current = None
                save_partial(consumed)
        if current is not None and current.writer.entries:
            shards.append(current.finish())
            current = None
    finally:
        if current is not None:
            current.abort()


class OpenShard:
    """A shard being written: local shards go through a temporary name, remote ones through a
    multipart upload that only becomes visible when it completes."""

    def __init__(self, dst: str, stem: str, options: dict | None):
        self.dst, self.stem, self.options = dst, stem, options
        self.url = join(dst, f"{stem}.tar")
        self.local = protocol_of(dst) == "file"
        self.tmp = f"{strip_protocol(self.url)}.tmp" if self.local else None
        fs = filesystem(dst, options)
        self.sink = open(self.tmp, "wb") if self.local else fs.open(strip_protocol(self.url), "wb")
        self.writer = ShardWriter(self.sink)

    def finish(self) -> ShardInfo:
        size, digest = self.writer.close()
        self.sink.close()
        if self.local:
            os.replace(self.tmp, strip_protocol(self.url))
        write_bytes(join(self.dst, f"{self.stem}.idx"), self.writer.index_text().encode(), self.options)
        return ShardInfo(name=f"{self.stem}.tar", index=f"{self.stem}.idx", samples=len(self.writer.entries),
                         bytes=size, sha256=digest)

    def abort(self):
        self.writer.discard()
        try:
            self.sink.close() if self.local else self.sink.discard()
        except Exception:  # noqa: BLE001 - best effort: the shard is rewritten on resume anyway
            pass
        if self.local and os.path.exists(self.tmp):
            os.remove(self.tmp)


def _save_partial(dst, options, shards, skipped, consumed, fingerprint, classes, policy, seed, source):
    partial = Manifest(shards=shards, classes=list(classes), image=policy, skipped=skipped, seed=seed, source=source)
    data = json.loads(partial.to_json()) | {"consumed": consumed, "fingerprint": fingerprint}
    write_bytes(join(dst, PARTIAL), json.dumps(data).encode(), options)


def _resume_state(dst, options, fingerprint):
    fs = filesystem(dst, options)
    path = strip_protocol(join(dst, PARTIAL))
    if not fs.exists(path):
        return [], [], 0
    data = json.loads(fs.cat_file(path))
    if data.get("fingerprint") != fingerprint:
        raise DataError(f"{join(dst, PARTIAL)}: an unfinished write with other sources or settings is here; "
                         f"use the same arguments to resume it, or delete the folder")
    shards = [ShardInfo(**s) for s in data["shards"]]
    for shard in shards:
        if not fs.exists(strip_protocol(join(dst, shard.name))):
            raise DataError(f"{join(dst, shard.name)} is listed as finished but missing")
    return shards, data["skipped"], data["consumed"]
