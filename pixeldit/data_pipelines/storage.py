"""One way to reach storage: fsspec, for local paths, s3://, gs:// and https:// alike.

Endpoint and credentials come from the config's `data.storage` options or the
usual environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which
s3fs and gcsfs read themselves. Filesystems are opened lazily per process:
s3fs instances are not fork-safe, so a forked process (a writer's pool
worker) opens its own.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import time
from typing import Any, Callable, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

_FS_CACHE: dict[tuple, Any] = {}


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def filesystem(url: str, options: dict | None = None):
    """The fsspec filesystem for `url`, one instance per (process, protocol, options)."""
    protocol = protocol_of(url)
    options = dict(options or {})
    if protocol == "s3" and "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    key = (os.getpid(), protocol, repr(sorted(options.items())))
    if key not in _FS_CACHE:
        # skip_instance_cache: fsspec's own cache would hand a forked child its parent's s3fs
        extra = {"skip_instance_cache": True} if protocol != "file" else {}
        _FS_CACHE[key] = fsspec.filesystem(protocol, **options, **extra)
    return _FS_CACHE[key]


def strip_protocol(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


class MappedFile:
    """A local file read through mmap: `read` hands out views of the page cache, not copies.

    The shard reader cuts samples out of what it reads, and the decoders read them in place, so
    a local image is never copied before it is decoded (the read copy cost ~6 µs per 256² JPEG,
    1.5% of its decode). Views keep the mapping alive; it goes with the last one. The size is
    fixed when the file is opened: a shard truncated while it is being read would fault, so
    shards are written to a temporary name and renamed (the writer does).
    """

    def __init__(self, path: str):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.view = memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else b"")
        self.pos = 0

    def seek(self, pos: int):
        self.pos = pos

    def read(self, n: int) -> memoryview:
        out = self.view[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


class TransientError(OSError):
    """A read failed in a way that a retry may cure."""


def is_transient(error: BaseException) -> bool:
    """5xx, throttling, connection resets and short reads: worth a retry; missing files are not."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(error, (TransientError, ConnectionError, TimeoutError, EOFError)):
        return True
    text = f"{type(error).__name__} {error}".lower()
    markers = ("slowdown", "503", "500", "502", "504", "throttl", "reset", "timeout", "timed out",
               "payload", "connection", "incompleteread", "broken pipe", "temporarily")
    return isinstance(error, OSError) or any(m in text for m in markers)


def with_retries(what: str, fn: Callable[[], T], attempts: int = 5, base_delay: float = 0.2,
                 on_retry: Callable[[BaseException], None] | None = None) -> T:
    """Call fn, retrying transient failures with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(e):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s: %s: %s (attempt %d/%d, retrying in %.2fs)", what, type(e).__name__, e,
                        attempt, attempts, delay)
            if on_retry is not None:
                on_retry(e)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str, options: dict | None = None, attempts: int = 5) -> bytes:
    fs = filesystem(url, options)
    return with_retries(url, lambda: fs.cat_file(strip_protocol(url)), attempts)


def write_bytes(url: str, data: bytes, options: dict | None = None, attempts: int = 5):
    """Write a whole object; local files go through a temporary name and a rename (atomic)."""
    fs = filesystem(url, options)
    path = strip_protocol(url)
    if protocol_of(url) == "file":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes (manifests, checkpoint markers)
        os.replace(tmp, path)
        return
    with_retries(url, lambda: fs.pipe_file(path, data), attempts)


def exists(url: str, options: dict | None = None) -> bool:
    return filesystem(url, options).exists(strip_protocol(url))
