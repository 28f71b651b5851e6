"""`manifest.json`: what a shard set holds, so readers never list buckets or open tars to plan.

It names the shards with their sample counts, bytes and sha256, the image
policy, the class list and every source item that was skipped (with why).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..errors import DataError, MissingFileError
from ..storage import join, read_bytes, write_bytes

FORMAT = "pixeldit-shards"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class ShardInfo:
    name: str          # tar file name, relative to the manifest's folder
    index: str         # DALI index file name
    samples: int
    bytes: int
    sha256: str


@dataclass
class ImagePolicy:
    mode: str = "original"   # "original" bytes, or "adm" centre crop to `size`
    size: int | None = None
    format: str = "jpg"      # storage format of re-encoded images: jpg | png | webp (lossless)
    quality: int = 95


@dataclass
class Manifest:
    shards: list[ShardInfo]
    classes: list[str]
    image: ImagePolicy = field(default_factory=ImagePolicy)
    skipped: list[dict] = field(default_factory=list)
    seed: int = 0
    source: str = ""
    format: str = FORMAT
    version: int = VERSION
    # where a sample's label is, first match wins: `cls` (the .cls member) or `json:FIELD`
    label_sources: list[str] = field(default_factory=lambda: ["cls"])
    # the shards' folder (absolute path or URL) when it is not the manifest's: sets indexed in
    # place by `pixeldit shards index --out`; the .idx files stay beside the manifest
    shard_base: str = ""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        data = parse_manifest_json(text, where, FORMAT, VERSION)
        try:
            data["image"] = ImagePolicy(**data.get("image", {}))
            return cls(**data)
        except TypeError as e:
            raise DataError(f"{where}: malformed manifest: {e}") from None


def parse_manifest_json(text: str, where: str, fmt: str, version: int) -> dict:
    """The manifest's fields with `shards` as ShardInfo, after checking its format and version."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON: {e}") from None
    if data.get("format") != fmt:
        raise DataError(f"{where}: not a {fmt} manifest (format={data.get('format')!r})")
    if data.get("version") != version:
        raise DataError(f"{where}: manifest version {data.get('version')} is not supported (expected {version})")
    data.pop("num_samples", None)
    try:
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: malformed manifest: {e}") from None
    return data


def manifest_url(root: str) -> str:
    return root if root.endswith(".json") else join(root, MANIFEST)


def shard_root(url: str) -> str:
    return url.rsplit("/", 1)[0] if url.endswith(".json") else url.rstrip("/")


def shard_url(manifest, root: str, name: str) -> str:
    """Where the shard `name` of `manifest` (read from `root`) is: under its shard_base, else beside it."""
    # feature manifests have no shard_base: their shards are always beside them
    return join(getattr(manifest, "shard_base", "") or shard_root(root), name)


def load_manifest(root: str, options: dict | None = None) -> Manifest:
    return read_manifest(root, options)[0]


def read_manifest(root: str, options: dict | None = None) -> tuple[Manifest, str]:
    """The manifest and the sha256 of its bytes (what a REPA feature cache records of its images)."""
    url = manifest_url(root)
    try:
        data = read_bytes(url, options)
    except FileNotFoundError:
        raise MissingFileError(f"no shard manifest at {url} (write shards with `pixeldit shards write`)") from None
    return Manifest.from_json(data.decode(), url), hashlib.sha256(data).hexdigest()


def save_manifest(root: str, manifest: Manifest, options: dict | None = None, name: str = MANIFEST):
    write_bytes(join(root, name), manifest.to_json().encode(), options)
