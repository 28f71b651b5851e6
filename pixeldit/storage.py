"""One way to reach storage: fsspec, for local paths, s3://, gs:// and https:// alike.

Endpoint and credentials come from the config's `data.endpoint_url` or the usual environment
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which s3fs and gcsfs read themselves.
Filesystems are opened lazily per process: s3fs instances are not fork-safe, so a forked process
(a writer's pool worker) opens its own.

Failures leave this module typed (`StorageError` and its subclasses), classified by exception
type, error code, HTTP status and errno, never by message text. A transient one is retried with
exponential backoff and jitter until the operation's deadline (`io_timeout_s` in the options,
`data.io_timeout_s` in the config); anything else, and a transient one past its deadline, is
raised as one line naming the URL, the cause and the fix. Retries are counted where they
happen: ours through the caller's hook, the S3 client's own through botocore's events.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import mmap
import os
import random
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, TypeVar

import aiohttp
import botocore.exceptions
import fsspec

from .errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

IO_TIMEOUT_S = 120.0     # data.io_timeout_s's default, for callers without a config (checkpoints, tools)
WARN_EVERY_S = 10.0      # a retried operation says so at most this often
CLIENT_RETRIES = 2       # data.retries's default: retries of one request inside the S3 client, before ours
CLIENT_BACKOFF_S = 0.05  # the client's retries are quick; ours, around them, back off further
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0

_FS_CACHE: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------- errors


class StorageError(DataError, OSError):
    """A storage operation failed. The message names the URL, the cause and the fix."""


class TransientError(StorageError):
    """A failure a retry may cure: 5xx, throttling, a reset, a timeout, a body cut short."""


class StorageTimeout(StorageError, TimeoutError):
    """A transient failure that outlasted the operation's deadline (data.io_timeout_s)."""


class PermanentStorageError(StorageError):
    """A failure no retry cures (a bad request, a redirect, an unknown error code)."""


class ObjectNotFound(PermanentStorageError, FileNotFoundError):
    """The object (shard, index, manifest) or its bucket does not exist."""


class AccessDenied(PermanentStorageError, PermissionError):
    """Refused by the storage (403, bad or missing credentials)."""


class CorruptContent(StorageError, ValueError):
    """The bytes arrived but are not what the manifest, the index or the tar format say."""


# S3 error codes, by what they mean for a retry (https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html)
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound", "404"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "InvalidSecurity",
                 "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "NotSignedUp",
                 "InvalidPayer", "RequestTimeTooSkewed", "Forbidden", "403", "401"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted", "BadGateway",
                    "GatewayTimeout"}
_TRANSIENT_STATUS = {408, 429}
_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH,
                    errno.EPIPE, errno.EREMOTEIO}


def _gcs_http_error() -> tuple[type, ...]:
    """gcsfs's HTTP error (a plain Exception carrying the status as `.code`), when gcsfs is
    installed: gs:// is optional (`pixeldit[gcs]`), and without gcsfs no such error is raised."""
    try:
        from gcsfs.retry import HttpError
    except ImportError:
        return ()
    return (HttpError,)


_GCS_HTTP_ERROR = _gcs_http_error()
# what a storage call can raise; anything else (a TypeError, a KeyError) is a bug and keeps its traceback
STORAGE_EXCEPTIONS = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                      aiohttp.ClientError, *_GCS_HTTP_ERROR)
_CREDENTIALS = (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError,
                botocore.exceptions.CredentialRetrievalError)
_CLIENT_TRANSIENT = (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError,
                     botocore.exceptions.IncompleteReadError, aiohttp.ClientPayloadError,
                     aiohttp.ClientConnectionError)


def _http_status_and_code(error: BaseException) -> tuple[int | None, str | None] | None:
    """(HTTP status, S3 error code) of a ClientError or aiohttp response error, or of its cause
    (s3fs turns a ClientError into an OSError whose __cause__ is the original)."""
    while error is not None:
        if isinstance(error, botocore.exceptions.ClientError):
            response = error.response or {}
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode"), response.get("Error", {}).get("Code")
        if isinstance(error, aiohttp.ClientResponseError):
            return error.status, None
        if isinstance(error, _GCS_HTTP_ERROR) and isinstance(getattr(error, "code", None), int):
            return error.code, None
        error = error.__cause__
    return None


def _transient_http(status: int | None, code: str | None) -> bool:
    return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS or (status or 0) >= 500


def _refused(error: BaseException | None) -> bool:
    """Whether the connection was refused (nothing listens at the endpoint), however wrapped:
    botocore's EndpointConnectionError keeps the ConnectionRefusedError as its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionRefusedError) or getattr(error, "errno", None) == errno.ECONNREFUSED:
            return True
        error = error.__cause__ or error.__context__
    return False


def _access_fix(url: str) -> str:
    protocol = protocol_of(url)
    if protocol in ("gs", "gcs"):
        return ("check the Google credentials (GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth "
                "application-default login`) and the bucket's IAM permissions")
    if protocol in ("http", "https"):
        return "check that the URL is public or give its credentials in the storage options"
    return "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's policy"


def describe(error: BaseException) -> str:
    """A short one-line account of a failure, e.g. 'HTTP 503 SlowDown' or 'ReadTimeoutError: ...'."""
    http = _http_status_and_code(error)
    if http is not None:
        status, code = http
        return " ".join(str(x) for x in ("HTTP", status, code) if x is not None)
    text = " ".join(str(error).split())
    if not text and error.__cause__ is not None:  # fsspec's FSTimeoutError says nothing; what it wraps does
        return describe(error.__cause__)
    text = f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__
    # an endpoint that refuses is retried (it may be restarting), so the warnings must say so plainly
    return f"connection refused ({text})" if _refused(error) else text


def classify(error: BaseException, url: str) -> StorageError | None:
    """The typed error for a failure of a storage call on `url`; None when it is no storage failure."""
    if isinstance(error, StorageError):
        return error
    cause = describe(error)
    http = _http_status_and_code(error)
    if http is not None:
        status, code = http
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"{url}: not found ({cause}); check the URL (data.source) and that it was "
                                  f"written completely (`pixeldit shards verify`)")
        if code in _DENIED_CODES or status in (401, 403):
            return AccessDenied(f"{url}: access denied ({cause}); {_access_fix(url)}")
        if _transient_http(status, code):
            return TransientError(f"{url}: {cause}")
        return PermanentStorageError(f"{url}: refused ({cause}), which no retry cures; check the URL and the "
                                     f"storage settings (data.endpoint_url / AWS_ENDPOINT_URL, region, options)")
    if isinstance(error, _CREDENTIALS):
        return AccessDenied(f"{url}: no usable credentials ({cause}); set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the endpoint in data.endpoint_url "
                            f"or AWS_ENDPOINT_URL")
    if isinstance(error, botocore.exceptions.NoRegionError):
        return PermanentStorageError(f"{url}: {cause}; set AWS_DEFAULT_REGION")
    if isinstance(error, (*_CLIENT_TRANSIENT, TimeoutError, ConnectionError)):  # refused: the endpoint may restart
        return TransientError(f"{url}: {cause}")
    if isinstance(error, FileNotFoundError):
        return ObjectNotFound(f"{url}: not found; check the URL (data.source) and that it was written "
                              f"completely (`pixeldit shards verify`)")
    if isinstance(error, PermissionError):
        return AccessDenied(f"{url}: permission denied ({cause}); check the file's permissions or the credentials")
    if isinstance(error, OSError):
        if error.errno in _TRANSIENT_ERRNO:
            return TransientError(f"{url}: {cause}")
        return PermanentStorageError(f"{url}: {cause}, which no retry cures; check that the path is readable "
                                     f"and its disk or mount healthy (read it by hand), then rerun")
    return None


# ------------------------------------------------------------------------------------- retries


def request_timeout(io_timeout_s: float, client_retries: int) -> float:
    """botocore's connect and read timeout each: a silent endpoint fails one request, all its
    client attempts, in a fifth of the operation's deadline (a quarter with the client's backoff
    and some slack), leaving room for our retries."""
    return io_timeout_s / (5 * (client_retries + 1))


class Throttle:
    """Lets something through at most every WARN_EVERY_S seconds (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last: float | None = None

    def ready(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last < WARN_EVERY_S:
                return False
            self._last = now
            return True


# one for every operation of the process: in a brown-out every lane's reads fail at once
_RETRY_WARNINGS = Throttle()


class Retrying:
    """The retry state of one storage operation: backoff with jitter, a deadline, warnings.

    The deadline counts from the start of the first failed attempt of a streak (a request that
    hangs spends the budget too), but a failed attempt counts for at most a quarter of the
    deadline, what a silent endpoint's request takes (`request_timeout`): a longer one was a
    transfer making progress. No attempt starts that would end past the deadline should it fail
    as slowly as the slowest so far, so the operation gives up within `timeout_s`.
    `succeeded()` ends a streak.
    """

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self.attempt_bound = timeout_s / 4
        self.failures = 0
        self.since: float | None = None
        self.slowest = 0.0

    def succeeded(self):
        if self.failures:
            log.info("%s: recovered after %d retries", self.url, self.failures)
        self.failures, self.since, self.slowest = 0, None, 0.0

    def wait(self, error: BaseException, attempt_started: float):
        """After a failed attempt: sleep before the next one, or raise the typed error."""
        typed = classify(error, self.url)
        if typed is None:  # no storage failure: a bug, which keeps its own traceback
            raise error
        if not isinstance(typed, TransientError):
            raise typed from error
        now = time.monotonic()
        spent = min(now - attempt_started, self.attempt_bound)
        if self.since is None:
            self.since = now - spent
        self.slowest = max(self.slowest, spent)
        self.failures += 1
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (self.failures - 1)) * (0.5 + 0.5 * random.random())
        elapsed = now - self.since
        if elapsed + delay + self.slowest > self.timeout_s:
            raise StorageTimeout(f"{self.url}: still failing after {self.failures} attempts in {elapsed:.1f} s "
                                 f"({describe(error)}), and data.io_timeout_s={self.timeout_s:g} leaves no time "
                                 f"for another; check that the storage endpoint answers (data.endpoint_url / "
                                 f"AWS_ENDPOINT_URL), or raise data.io_timeout_s") from error
        if _RETRY_WARNINGS.ready():
            log.warning("%s: %s; retry %d in %.2f s (failing for %.1f s of data.io_timeout_s=%g)", self.url,
                        describe(error), self.failures, delay, elapsed, self.timeout_s)
        time.sleep(delay)


def with_retries(what: str, fn: Callable[[], T], timeout_s: float = IO_TIMEOUT_S,
                 on_retry: Callable[[BaseException], None] | None = None) -> T:
    """fn(), its transient failures retried until `timeout_s`; other failures raised typed."""
    retrying = Retrying(what, timeout_s)
    while True:
        started = time.monotonic()
        try:
            result = fn()
        except STORAGE_EXCEPTIONS as e:
            retrying.wait(e, started)
            if on_retry is not None:
                on_retry(e)
            continue
        retrying.succeeded()
        return result


# ------------------------------------------------------------------------------------- client retries


class ClientRetries:
    """The S3 client's own retries of a request: decided, counted and reported here.

    botocore's retry handler is switched off (one attempt) and this one, on the same
    `needs-retry` event, retries what `classify` calls transient, `retries` times at most, after
    a short jittered backoff. botocore's own backoff (up to seconds per retry, whatever the
    deadline) would spend an operation's budget unseen, and its retries were never counted: a
    brown-out absorbed there left `data/retries` at zero and the console silent.
    """

    def __init__(self, endpoint: str, retries: int):
        self.endpoint, self.retries = endpoint, retries
        self._lock = threading.Lock()
        self._pending = 0              # not yet taken into a reader's stats
        self._since_warning = 0
        self._warnings = Throttle()

    def on_needs_retry(self, attempts: int, response=None, caught_exception=None, request_dict=None, **kwargs):
        if attempts > self.retries or (response is None and caught_exception is None):
            return None
        url = (request_dict or {}).get("url", "?").split("?")[0]
        if caught_exception is not None:
            if not isinstance(classify(caught_exception, url), TransientError):
                return None
            cause = describe(caught_exception)
        else:
            status = response[0].status_code
            code = (response[1] or {}).get("Error", {}).get("Code")
            if status < 300 or not _transient_http(status, code):
                return None
            cause = " ".join(str(x) for x in ("HTTP", status, code) if x)
        with self._lock:
            self._pending += 1
            self._since_warning += 1
            warn = self._warnings.ready()
            if warn:
                count, self._since_warning = self._since_warning, 0
        if warn:
            log.warning("storage %s: %d request(s) retried by the S3 client (last: %s %s); counted in data/retries",
                        self.endpoint, count, url, cause)
        return CLIENT_BACKOFF_S * 2 ** (attempts - 1) * (0.5 + 0.5 * random.random())

    def take(self) -> int:
        """Retries since the last call (each is taken once, by whichever reader asks first)."""
        with self._lock:
            count, self._pending = self._pending, 0
            return count


_CLIENT_RETRIES: dict[int, ClientRetries] = {}


def client_retries(fs) -> int:
    """Retries the S3 client of `fs` made since the last call; 0 for other filesystems."""
    counter = _CLIENT_RETRIES.get(id(fs))
    return counter.take() if counter is not None else 0


# ------------------------------------------------------------------------------------- filesystems


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def io_timeout(options: dict | None) -> float:
    """The deadline of one operation: `io_timeout_s` in the options (data.io_timeout_s), else the default."""
    return float((options or {}).get("io_timeout_s", IO_TIMEOUT_S))


def storage_options(endpoint_url: str | None, io_timeout_s: float, retries: int) -> dict:
    """The options `filesystem` takes for a config's data section (endpoint, deadline, client retries)."""
    options = {"io_timeout_s": io_timeout_s, "client_retries": retries}
    return {**options, "endpoint_url": endpoint_url} if endpoint_url else options


def filesystem(url: str, options: dict | None = None):
    """The fsspec filesystem for `url`, one instance per (process, protocol, options).

    `options` are fsspec's, plus `io_timeout_s` (the deadline) and `client_retries` (data.retries):
    an S3 client's timeouts are set from them (unless the options' config_kwargs say otherwise),
    so a request fails in time for our retries to stay within the deadline.
    """
    protocol = protocol_of(url)
    options = dict(options or {})
    timeout = io_timeout(options)
    retries = int(options.pop("client_retries", CLIENT_RETRIES))
    options.pop("io_timeout_s", None)
    if protocol == "s3" and "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    key = (os.getpid(), protocol, timeout, retries, repr(sorted(options.items())))
    with _FS_LOCK:
        if key not in _FS_CACHE:
            _FS_CACHE[key] = _open_filesystem(protocol, options, timeout, retries)
        return _FS_CACHE[key]


def _open_filesystem(protocol: str, options: dict, timeout: float, retries: int):
    if protocol in ("file", "local"):
        return fsspec.filesystem(protocol, **options)
    if protocol in ("http", "https"):
        # aiohttp's default waits 5 minutes in all and forever on a silent socket once connected;
        # fsspec's HTTP filesystem does not retry, so one request may take a fifth of the deadline
        per_request = request_timeout(timeout, 0)
        options["client_kwargs"] = {
            "timeout": aiohttp.ClientTimeout(total=None, connect=per_request, sock_read=per_request),
            **options.get("client_kwargs", {})}
    if protocol != "s3":
        # skip_instance_cache: fsspec's own cache would hand a forked child its parent's instance
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    per_request = request_timeout(timeout, retries)
    options["config_kwargs"] = {
        "connect_timeout": per_request, "read_timeout": per_request,
        "retries": {"total_max_attempts": 1, "mode": "standard"},  # ClientRetries decides instead
        **options.get("config_kwargs", {})}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    # s3fs's own retry loop (5 attempts around every call and every body read, uncounted, no
    # deadline) multiplied botocore's and ours: a silent endpoint hung for minutes. Ours replaces it.
    fs.retries = 1
    counter = ClientRetries(options.get("endpoint_url") or "(AWS)", retries)
    events = fs.s3.meta.events  # creates the client; no request is made
    events.register_first("needs-retry.s3", counter.on_needs_retry)
    _CLIENT_RETRIES[id(fs)] = counter
    return fs


def strip_protocol(url: str) -> str:
    """The path a filesystem of `url`'s protocol takes: without the protocol, except for HTTP,
    whose filesystem takes whole URLs."""
    if protocol_of(url) in ("http", "https"):
        return url
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


class RangedFile(io.RawIOBase):
    """A remote object read by ranged requests (`cat_file(path, start, end)`), one per read.

    s3fs's own file object turns a read timeout into an IndexError (its `_fetch_range` reads
    `args[0]` of any OSError, and fsspec's FSTimeoutError has none): an endpoint silent in the
    middle of a shard became a bug's traceback instead of a transient failure retried until the
    deadline. Wrap it in io.BufferedReader for many small reads.
    """

    def __init__(self, fs, url: str):
        super().__init__()
        self.fs, self.path = fs, strip_protocol(url)
        self.size = fs.size(self.path)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        end = min(self.pos + len(buffer), self.size)
        if end <= self.pos:
            return 0
        data = self.fs.cat_file(self.path, start=self.pos, end=end)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def read_bytes(url: str, options: dict | None = None, on_retry: Callable[[BaseException], None] | None = None) -> bytes:
    fs = filesystem(url, options)
    return with_retries(url, lambda: fs.cat_file(strip_protocol(url)), io_timeout(options), on_retry)


def write_bytes(url: str, data: bytes, options: dict | None = None):
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
    with_retries(url, lambda: fs.pipe_file(path, data), io_timeout(options))


def exists(url: str, options: dict | None = None) -> bool:
    fs = filesystem(url, options)
    return with_retries(url, lambda: fs.exists(strip_protocol(url)), io_timeout(options))


# ------------------------------------------------------------------- paths written by several processes
# Checkpoints and other run outputs: a local folder or any fsspec URL, written by every rank. Options
# (an endpoint) registered for a root apply to every URL below it; other ranks and processes write
# there too, so these helpers never trust a cached listing.

_ROOT_OPTIONS: dict[str, dict] = {}


def register_root(root: str, options: dict | None):
    """Open every URL below `root` with `options` (e.g. checkpoint.endpoint_url)."""
    if is_remote(root):
        _ROOT_OPTIONS[root.rstrip("/")] = dict(options or {})


def is_remote(url: str) -> bool:
    return protocol_of(url) != "file"


def options_for(url: str) -> dict:
    """The options registered for the longest root above `url`; the environment's endpoint otherwise."""
    roots = [r for r in _ROOT_OPTIONS if url == r or url.startswith(r + "/")]
    options = dict(_ROOT_OPTIONS[max(roots, key=len)]) if roots else {}
    if protocol_of(url) == "s3" and "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]  # as filesystem() does, for DCP's writer too
    return options


def path_join(base: str, *parts: str) -> str:
    """os.path.join for a local path, `join` for a URL."""
    return join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def uncached_filesystem(url: str):
    fs = filesystem(url, options_for(url))
    fs.invalidate_cache()  # another rank or process may have written since the last listing
    return fs


def exists_now(url: str) -> bool:
    return os.path.exists(url) if not is_remote(url) else uncached_filesystem(url).exists(url)


def read_bytes_if_present(url: str) -> bytes | None:
    try:
        return read_bytes(url, options_for(url))
    except FileNotFoundError:
        return None


def write_whole(url: str, data: bytes):
    """All or nothing: one PUT on object storage, a temporary name and a rename locally."""
    write_bytes(url, data, options_for(url))


def list_names(url: str) -> set[str] | None:
    """The names directly inside `url`, None when it is not there."""
    if not is_remote(url):
        return set(os.listdir(url)) if os.path.isdir(url) else None
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in uncached_filesystem(url).ls(url, detail=False)}
    except FileNotFoundError:
        return None


def remove_tree(url: str, first: str | None = None):
    """Delete the folder `url`, its file `first` before the rest (a marker that must not outlive the
    folder's other files). A failure raises OSError: the caller decides whether it is fatal."""
    if not is_remote(url):
        if not os.path.lexists(url):
            return
        if first is not None:
            try:
                os.remove(os.path.join(url, first))
            except FileNotFoundError:
                pass
        shutil.rmtree(url)
        return
    fs = uncached_filesystem(url)
    if first is not None and fs.exists(join(url, first)):
        fs.rm_file(join(url, first))
    if fs.exists(url):
        fs.rm(url, recursive=True)


@contextlib.contextmanager
def local_folder(url: str, *, download: bool = False, upload: bool = False):
    """A local folder standing in for `url`: `url` itself when local; otherwise a temporary copy
    (downloaded first with `download`, uploaded afterwards with `upload`) for writers and readers
    that only know local files (DeepSpeed). The copy lives under $TMPDIR and is removed after."""
    if not is_remote(url):
        if upload:
            os.makedirs(url, exist_ok=True)
        yield url
        return
    fs, base = uncached_filesystem(url), strip_protocol(url).rstrip("/")
    stage = tempfile.mkdtemp(prefix="pixeldit-ckpt-")
    local = os.path.join(stage, os.path.basename(base))  # its parent is ours: DeepSpeed writes beside it
    os.makedirs(local)
    try:
        if download:
            remote = fs.find(base)
            if not remote:
                raise FileNotFoundError(f"{url}: no objects")
            files = [os.path.join(local, os.path.relpath(p, base)) for p in remote]
            for folder in {os.path.dirname(f) for f in files}:
                os.makedirs(folder, exist_ok=True)
            # lists: fsspec transfers them concurrently (a universal checkpoint is thousands of small files)
            with_retries(url, lambda: fs.get(remote, files))
        yield local
        if upload:
            files = [os.path.join(d, n) for d, _, names in os.walk(local) for n in names]
            with_retries(url, lambda: fs.put(files, [f"{base}/{os.path.relpath(f, local)}" for f in files]))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
