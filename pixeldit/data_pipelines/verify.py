"""`pixeldit shards verify`: check a manifest against its shards and say what is wrong."""

from __future__ import annotations

import hashlib
import io

from tqdm import tqdm

from . import images
from .index_shards import label_from
from .manifest import load_manifest, shard_root, shard_url
from ..storage import exists, join, read_bytes
from .tario import iter_samples, parse_index


def verify_shards(root: str, options: dict | None = None, decode: bool = False, progress: bool = True) -> list[str]:
    """Problems found, one line each naming the file; an empty list means the set is sound."""
    manifest = load_manifest(root, options)
    base = shard_root(root)
    problems = []
    for shard in tqdm(manifest.shards, desc="verifying", unit="shard", disable=not progress):
        url = shard_url(manifest, root, shard.name)
        try:
            data = read_bytes(url, options)
        except FileNotFoundError:
            problems.append(f"{url}: missing")
            continue
        if len(data) != shard.bytes:
            problems.append(f"{url}: {len(data)} bytes, manifest says {shard.bytes}")
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            problems.append(f"{url}: sha256 differs from the manifest")
        index_url = join(base, shard.index)
        if not exists(index_url, options):  # retried and typed, within the deadline, as every read
            problems.append(f"{index_url}: missing (DALI needs it)")
        else:
            try:
                count = len(parse_index(read_bytes(index_url, options).decode(), index_url))
                if count != shard.samples:
                    problems.append(f"{index_url}: {count} samples, manifest says {shard.samples}")
            except ValueError as e:
                problems.append(str(e))
        # samples `shards index` left out of a foreign shard are listed in the manifest, not indexed;
        # a shard it found cut (an entry without a key) is indexed up to the cut
        left_out = {s["key"] for s in manifest.skipped if s.get("shard") == shard.name}
        cut = None in left_out
        try:
            n = 0
            for key, files in iter_samples(io.BytesIO(data), url):
                if key in left_out:
                    continue
                n += 1
                _, label, problem = label_from(files, tuple(manifest.label_sources))
                if problem is not None:
                    problems.append(f"{url}: sample {key!r}: {problem}")
                elif not 0 <= label < len(manifest.classes):
                    problems.append(f"{url}: sample {key!r} has label {label} outside the "
                                    f"{len(manifest.classes)} classes")
                if decode:
                    image = next((files[e] for e in images.IMAGE_EXTENSIONS if e in files), None)
                    if image is None:
                        problems.append(f"{url}: sample {key!r} has no image ({sorted(files)})")
                    else:
                        try:
                            images.decode_rgb(image)
                        except Exception as e:  # noqa: BLE001
                            problems.append(f"{url}: sample {key!r} does not decode: {type(e).__name__}: {e}")
            if n != shard.samples:
                problems.append(f"{url}: {n} samples, manifest says {shard.samples}")
        except (ValueError, OSError) as e:
            if not cut:
                problems.append(f"{url}: unreadable tar: {e}")
    return problems
