"""Real-part object storage for tests: moto's S3 server in a subprocess, plus a fault proxy.

No mocks: `s3_endpoint` runs ``python -m moto.server`` on a free loopback port and every
test talks real HTTP to it through s3fs/botocore/aiohttp. `FaultProxy` is a small threaded
HTTP proxy (stdlib only) that sits between the client and moto and can answer 503 SlowDown,
reset the connection, cut a response body short, or fall silent mid-body, for the next N
matching requests.

Fixtures (plain pytest fixtures; a conftest can re-export them with
``from tests.s3_server import s3_endpoint, s3_bucket, faulty_s3``):

* ``s3_endpoint`` (session): an `S3Endpoint` with ``.url``, ``.storage_options``,
  ``.make_bucket()``, ``.client()``, ``.filesystem()``.
* ``s3_bucket`` (function): the name of a fresh, uniquely named bucket on that endpoint.
* ``faulty_s3`` (function): a running `FaultProxy` in front of ``s3_endpoint``.

How s3fs 2026.9.0 reacts to each fault is pinned down in tests/test_s3_server.py.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

HOST = "127.0.0.1"
FAKE_KEY = "testing-key"
FAKE_SECRET = "testing-secret"
REGION = "us-east-1"

# Short timeouts so that nothing in a test can hang for long. botocore "standard" retries:
# max_attempts counts retries, so 3 means 4 attempts, for 5xx/throttling and connection
# errors. s3fs adds its own retry loop (S3FileSystem.retries = 5 attempts) around every call
# and around reading a GET's body; aiohttp retries an idempotent request once on a reset.
DEFAULT_CONFIG_KWARGS = {
    "connect_timeout": 5,
    "read_timeout": 5,
    "retries": {"max_attempts": 3, "mode": "standard"},
}


def s3_storage_options(endpoint_url: str, key: str = FAKE_KEY, secret: str = FAKE_SECRET,
                       region: str = REGION, **config_overrides) -> dict:
    """fsspec/s3fs options for an S3-compatible endpoint: ``fsspec.filesystem("s3", **opts)``.

    A fresh dict every call, so callers may edit it. It deliberately holds no
    ``skip_instance_cache`` (pixeldit.storage.filesystem adds that itself).
    """
    config = {**DEFAULT_CONFIG_KWARGS, **config_overrides}
    config["retries"] = dict(config["retries"])
    return {
        "endpoint_url": endpoint_url,
        "key": key,
        "secret": secret,
        "client_kwargs": {"region_name": region},
        "config_kwargs": config,
    }


def _filesystem(options: dict, overrides: dict):
    import s3fs

    options = {**options, **overrides,
               "config_kwargs": {**options.get("config_kwargs", {}),
                                 **overrides.get("config_kwargs", {})}}
    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def unique_name(prefix: str = "test") -> str:
    """A valid, unique bucket name (lowercase, <= 63 chars)."""
    return f"{prefix.lower()[:40]}-{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------------------------
# moto server
# --------------------------------------------------------------------------------------------


@dataclass
class S3Endpoint:
    """A running moto S3 server."""

    url: str
    process: subprocess.Popen | None = None
    key: str = FAKE_KEY
    secret: str = FAKE_SECRET
    region: str = REGION
    log_path: str | None = None
    _client: object = field(default=None, repr=False)

    @property
    def storage_options(self) -> dict:
        return s3_storage_options(self.url, self.key, self.secret, self.region)

    def client(self):
        """A boto3 S3 client talking straight to the server (cached)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self.url, aws_access_key_id=self.key,
                aws_secret_access_key=self.secret, region_name=self.region,
                config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}),
            )
        return self._client

    def make_bucket(self, name: str | None = None, prefix: str = "test") -> str:
        """Create a bucket (a unique name when `name` is None) and return its name."""
        name = name or unique_name(prefix)
        self.client().create_bucket(Bucket=name)
        return name

    def filesystem(self, **overrides):
        """A new, uncached s3fs.S3FileSystem on this endpoint (``config_kwargs`` are merged)."""
        return _filesystem(self.storage_options, overrides)

    def log_tail(self, n: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")


def _wait_until_answers(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy env
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early with code {proc.returncode}")
        try:
            with opener.open(url + "/moto-api/", timeout=2) as r:
                if r.status < 500:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"moto server at {url} did not answer within {timeout}s: {last!r}")


def _stop_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the server's process group (it was started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def moto_server(startup_timeout: float = 30, attempts: int = 3) -> Iterator[S3Endpoint]:
    """Run ``python -m moto.server`` on a free loopback port; stop its process group at exit."""
    log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)
    log.close()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "AWS_DEFAULT_REGION": REGION}
    proc = None
    error: Exception | None = None
    for _ in range(attempts):  # a free port can be taken between probing and binding
        port = free_port()
        url = f"http://{HOST}:{port}"
        with open(log.name, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        try:
            _wait_until_answers(url, proc, startup_timeout)
            break
        except Exception as e:  # noqa: BLE001
            error = e
            _stop_process_group(proc)
            proc = None
    if proc is None:
        with open(log.name, "rb") as f:
            tail = f.read()[-4000:].decode(errors="replace")
        os.unlink(log.name)
        raise RuntimeError(f"could not start moto server: {error!r}\n{tail}")
    try:
        yield S3Endpoint(url=url, process=proc, log_path=log.name)
    finally:
        _stop_process_group(proc)
        with contextlib.suppress(OSError):
            os.unlink(log.name)


_SHARED_LOCK = threading.Lock()
_SHARED: dict = {"cm": None, "endpoint": None, "refs": 0}


@contextlib.contextmanager
def shared_moto_server() -> Iterator[S3Endpoint]:
    """One moto server per process, however many fixture definitions ask for it.

    A test module that imports the fixtures and a conftest that re-exports them give pytest
    two `s3_endpoint` definitions (two session caches); this keeps them on one server.
    """
    with _SHARED_LOCK:
        if _SHARED["refs"] == 0:
            cm = moto_server()
            _SHARED["endpoint"] = cm.__enter__()
            _SHARED["cm"] = cm
        _SHARED["refs"] += 1
        endpoint = _SHARED["endpoint"]
    try:
        yield endpoint
    finally:
        with _SHARED_LOCK:
            _SHARED["refs"] -= 1
            if _SHARED["refs"] == 0:
                cm, _SHARED["cm"], _SHARED["endpoint"] = _SHARED["cm"], None, None
                cm.__exit__(None, None, None)


_ENV_SET = {
    "AWS_ACCESS_KEY_ID": FAKE_KEY,
    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
    "AWS_DEFAULT_REGION": REGION,
    # keep the user's ~/.aws out of the tests
    "AWS_CONFIG_FILE": os.path.join(tempfile.gettempdir(), "pixeldit-tests-no-aws-config"),
    "AWS_SHARED_CREDENTIALS_FILE": os.path.join(tempfile.gettempdir(), "pixeldit-tests-no-aws-creds"),
}
_ENV_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
              "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """A moto S3 server for the whole session, with fake AWS credentials in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _ENV_SET.items():
            mp.setenv(k, v)
        for k in _ENV_UNSET:
            mp.delenv(k, raising=False)
        no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY"), HOST, "localhost") if x)
        mp.setenv("NO_PROXY", no_proxy)
        mp.setenv("no_proxy", no_proxy)
        with shared_moto_server() as endpoint:
            yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> str:
    """A fresh bucket with a unique name (not deleted afterwards: the server dies with the session)."""
    return s3_endpoint.make_bucket()


# --------------------------------------------------------------------------------------------
# Fault-injecting proxy
# --------------------------------------------------------------------------------------------

SLOWDOWN = "slowdown"   # any injected error status (503 SlowDown by default)
RESET = "reset"         # connection reset (RST) before a response, or right after the headers
TRUNCATE = "truncate"   # full Content-Length header, only part of the body, then close
PASSED = "passed"       # forwarded unchanged
STALL = "stall"         # full Content-Length header, part of the body, then silence (the connection stays open)

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
               "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
# query parameters that turn "GET /bucket/key" into something other than reading the object
_SUBRESOURCES = {"acl", "tagging", "uploads", "uploadId", "attributes", "legal-hold", "retention",
                 "restore", "select", "torrent", "object-lock"}


def is_object_path(path: str) -> bool:
    """True for path-style ``/bucket/key...`` URLs that address an object (not a bucket op)."""
    parts = urlsplit(path)
    bucket_key = parts.path.lstrip("/").split("/", 1)
    if len(bucket_key) < 2 or not bucket_key[1]:
        return False
    return not (set(parse_qs(parts.query, keep_blank_values=True)) & _SUBRESOURCES)


@dataclass
class FaultRule:
    kind: str
    remaining: int | None          # None: every matching request until cleared
    match: str | Callable[[str, str], bool] | None = None
    methods: tuple[str, ...] = ("GET",)
    objects_only: bool = True
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    after_headers: bool = False    # RESET: send status + headers first
    nbytes: int | None = None      # TRUNCATE: body bytes to send (else `fraction`)
    fraction: float = 0.5
    rst: bool = False              # TRUNCATE: end with a reset instead of a clean close
    stall_s: float = 60.0          # STALL: silent this long (or until the proxy stops), then close
    injected: int = 0

    def applies(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.methods and method.upper() not in self.methods:
            return False
        if self.objects_only and not is_object_path(path):
            return False
        if self.match is None:
            return True
        if callable(self.match):
            return bool(self.match(method, path))
        return self.match in path or self.match in unquote(path)


class ProxyRecord(NamedTuple):
    method: str
    path: str
    action: str        # PASSED, SLOWDOWN, RESET or TRUNCATE
    status: int | None  # status sent to (or meant for) the client


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"
    reset_sockets: set  # sockets closed by _reset (socket objects take no new attributes)

    def shutdown_request(self, request):
        if request in self.reset_sockets:
            self.reset_sockets.discard(request)
            # already closed with SO_LINGER=0: a shutdown(SHUT_WR) would have sent a FIN first
            with contextlib.suppress(OSError):
                request.close()
            return
        super().shutdown_request(request)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections are dropped after this
    server: _ProxyServer

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
        pass

    # connection bookkeeping, so that stop() can close connections held open by clients
    def setup(self):
        super().setup()
        self.server.proxy._track(self.connection, add=True)
        with self.server.proxy._lock:
            self.server.proxy._threads.add(threading.current_thread())

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.proxy._track(self.connection, add=False)

    def do_GET(self):
        try:
            self._handle()
        except (ConnectionError, TimeoutError):  # the client went away: not a proxy error
            self.close_connection = True

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- helpers
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes):
        up = self.server.proxy.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=self.server.proxy.upstream_timeout)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                lname = name.lower()
                if lname in _HOP_BY_HOP or lname in ("content-length", "expect"):
                    continue
                conn.putheader(name, value)  # Host is passed through: SigV4 signed it
            if body or self.command in ("PUT", "POST", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command != "HEAD" and resp.status not in (204, 304):
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(data))))
            return resp.status, resp.reason, headers, data
        finally:
            conn.close()

    def _send_head(self, status: int, reason: str, headers):
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()

    def _reset(self):
        """Abort the connection with a TCP RST (SO_LINGER 0, close without shutdown)."""
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.server.reset_sockets.add(sock)
        with contextlib.suppress(OSError):
            self.rfile.close()  # drop the makefile() reference so close() really closes
        with contextlib.suppress(OSError):
            sock.close()

    def _handle(self):
        proxy = self.server.proxy
        method, path = self.command, self.path
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        rule = proxy._take_rule(method, path)

        if rule is not None and rule.kind == SLOWDOWN:
            request_id = uuid.uuid4().hex[:16].upper()
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{rule.code}</Code>'
                   f"<Message>{rule.message}</Message><Resource>{unquote(urlsplit(path).path)}"
                   f"</Resource><RequestId>{request_id}</RequestId></Error>").encode()
            # record before answering, so a client that got its answer sees the count
            proxy._record(method, path, SLOWDOWN, rule.status)
            self._send_head(rule.status, http.HTTPStatus(rule.status).phrase, [
                ("Content-Type", "application/xml"), ("Content-Length", str(len(xml))),
                ("x-amz-request-id", request_id)])
            if method != "HEAD":
                self.wfile.write(xml)
            return
        if rule is not None and rule.kind == RESET and not rule.after_headers:
            proxy._record(method, path, RESET, None)
            self._reset()
            return

        try:
            status, reason, headers, data = self._forward(body)
        except (OSError, http.client.HTTPException) as e:
            xml = f"<Error><Code>BadGateway</Code><Message>{type(e).__name__}</Message></Error>".encode()
            proxy._record(method, path, "upstream-error", 502)
            self._send_head(502, "Bad Gateway", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(xml)))])
            self.wfile.write(xml)
            return

        if rule is None:
            proxy._record(method, path, PASSED, status)
            self._send_head(status, reason, headers)
            if method != "HEAD" and data:
                self.wfile.write(data)
        elif rule.kind == RESET:  # after headers
            proxy._record(method, path, RESET, status)
            self._send_head(status, reason, headers)
            self.wfile.flush()
            time.sleep(0.01)  # let the headers leave before the RST
            self._reset()
        elif rule.kind == STALL:  # correct headers, a prefix of the body, then nothing while the socket stays open
            n = max(0, min(rule.nbytes if rule.nbytes is not None else int(len(data) * rule.fraction), len(data) - 1))
            proxy._record(method, path, STALL, status)
            self._send_head(status, reason, headers)
            self.wfile.write(data[:n])
            self.wfile.flush()
            proxy._stopping.wait(rule.stall_s)
            self.close_connection = True
        else:  # TRUNCATE: correct headers, a prefix of the body, then close
            n = rule.nbytes if rule.nbytes is not None else int(len(data) * rule.fraction)
            n = max(0, min(n, len(data) - 1))
            proxy._record(method, path, TRUNCATE, status)
            self._send_head(status, reason, headers)
            if method != "HEAD":
                self.wfile.write(data[:n])
            self.wfile.flush()
            if rule.rst:
                time.sleep(0.01)
                self._reset()
            else:
                self.close_connection = True


class FaultProxy:
    """A loopback HTTP proxy in front of an S3 endpoint that injects faults on demand.

    Faults are queued with `slowdown` / `error`, `reset`, `truncate` and `stall`; each applies to the
    next `n` matching requests (n=None: all of them until `clear()`). By default a fault only
    matches GETs of object bodies (path-style ``/bucket/key``, not ListObjects, not HEAD);
    widen with ``methods=`` and ``objects_only=False``. ``match`` is a substring of the
    request path (raw or unquoted), e.g. "shard-000001", or a callable(method, path).
    Rules are tried in the order they were added; the first live match wins.

    ``counts`` maps "slowdown" / "reset" / "truncate" / "stall" / "passed" to how many requests got
    that treatment; ``records`` lists every request as a `ProxyRecord`.
    """

    def __init__(self, upstream_url: str, key: str = FAKE_KEY, secret: str = FAKE_SECRET,
                 region: str = REGION, port: int = 0, upstream_timeout: float = 30):
        self.upstream = urlsplit(upstream_url)
        self.upstream_url = upstream_url
        self.upstream_timeout = upstream_timeout
        self.key, self.secret, self.region = key, secret, region
        self._port = port
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._counts = {SLOWDOWN: 0, RESET: 0, TRUNCATE: 0, STALL: 0, PASSED: 0}
        self._stopping = threading.Event()  # wakes stalled handlers
        self.records: list[ProxyRecord] = []
        self._conns: set[socket.socket] = set()
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint: S3Endpoint | None = None  # set by the faulty_s3 fixture

    # -- lifecycle
    def start(self) -> "FaultProxy":
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _ProxyServer((HOST, self._port), _ProxyHandler)
        server.proxy = self
        server.reset_sockets = set()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FaultProxy:{server.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout)
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:  # wake handler threads blocked on idle keep-alive connections
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in [self._thread, *self.threads]:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))

    @property
    def threads(self) -> list[threading.Thread]:
        """The proxy's live threads (server loop and connection handlers)."""
        with self._lock:
            handlers = list(self._threads)
        return [t for t in [self._thread, *handlers] if t is not None and t.is_alive()]

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultProxy is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def storage_options(self) -> dict:
        return s3_storage_options(self.url, self.key, self.secret, self.region)

    def filesystem(self, **overrides):
        """A new, uncached s3fs.S3FileSystem through the proxy (``config_kwargs`` are merged)."""
        return _filesystem(self.storage_options, overrides)

    # -- faults
    def _add(self, rule: FaultRule) -> FaultRule:
        rule.methods = tuple(m.upper() for m in rule.methods)
        with self._lock:
            self._rules.append(rule)
        return rule

    def error(self, n: int | None = 1, match=None, status: int = 503, code: str = "SlowDown",
              message: str = "Please reduce your request rate.", methods=("GET",),
              objects_only: bool = True) -> FaultRule:
        """Answer the next n matching requests with an S3-style XML error (not forwarded)."""
        return self._add(FaultRule(SLOWDOWN, n, match, tuple(methods), objects_only,
                                   status=status, code=code, message=message))

    def slowdown(self, n: int | None = 1, match=None, **kw) -> FaultRule:
        """503 ``<Error><Code>SlowDown</Code>...`` for the next n matching requests."""
        return self.error(n, match, status=503, code="SlowDown", **kw)

    def reset(self, n: int | None = 1, match=None, after_headers: bool = False, methods=("GET",),
              objects_only: bool = True) -> FaultRule:
        """Reset (RST) the connection: before any response, or after status + headers."""
        return self._add(FaultRule(RESET, n, match, tuple(methods), objects_only,
                                   after_headers=after_headers))

    def truncate(self, n: int | None = 1, match=None, nbytes: int | None = None,
                 fraction: float = 0.5, rst: bool = False, methods=("GET",),
                 objects_only: bool = True) -> FaultRule:
        """Send the real headers (full Content-Length) but only `nbytes` (or `fraction`) of
        the body, then close cleanly (FIN) or, with rst=True, reset."""
        return self._add(FaultRule(TRUNCATE, n, match, tuple(methods), objects_only,
                                   nbytes=nbytes, fraction=fraction, rst=rst))

    def stall(self, n: int | None = 1, match=None, nbytes: int | None = None, fraction: float = 0.5,
              stall_s: float = 60.0, methods=("GET",), objects_only: bool = True) -> FaultRule:
        """Send the real headers and `nbytes` (or `fraction`) of the body, then nothing for
        `stall_s` seconds (or until the proxy stops) while the connection stays open: an
        endpoint that goes silent in the middle of a stream."""
        return self._add(FaultRule(STALL, n, match, tuple(methods), objects_only,
                                   nbytes=nbytes, fraction=fraction, stall_s=stall_s))

    def clear(self) -> None:
        """Drop all pending faults (counters and records are kept)."""
        with self._lock:
            self._rules.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self._counts, 0)
            self.records = []

    # -- counters
    @property
    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    @property
    def injected(self) -> int:
        """Total faults injected so far (all kinds)."""
        c = self.counts
        return c[SLOWDOWN] + c[RESET] + c[TRUNCATE] + c[STALL]

    @property
    def passed(self) -> int:
        return self.counts[PASSED]

    @property
    def pending(self) -> int | None:
        """Faults still queued (None if an unlimited rule is active)."""
        with self._lock:
            if any(r.remaining is None for r in self._rules):
                return None
            return sum(r.remaining for r in self._rules)

    def requests(self, method: str | None = None, match: str | None = None) -> list[ProxyRecord]:
        with self._lock:
            recs = list(self.records)
        return [r for r in recs if (method is None or r.method == method.upper())
                and (match is None or match in r.path or match in unquote(r.path))]

    # -- called from handler threads
    def _take_rule(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.applies(method, path):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    rule.injected += 1
                    return rule
        return None

    def _record(self, method: str, path: str, action: str, status: int | None) -> None:
        with self._lock:
            if action in self._counts:
                self._counts[action] += 1
            self.records.append(ProxyRecord(method, path, action, status))

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(sock)


@pytest.fixture
def faulty_s3(s3_endpoint: S3Endpoint) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's moto server; stopped (threads joined) at teardown."""
    with FaultProxy(s3_endpoint.url, s3_endpoint.key, s3_endpoint.secret, s3_endpoint.region) as proxy:
        proxy.endpoint = s3_endpoint  # direct access for setup (buckets, uploads) bypassing faults
        yield proxy
