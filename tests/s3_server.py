"""Object storage for tests: moto's S3 server in a subprocess, and a fault proxy in front of it.

No mocks: `s3_endpoint` runs ``python -m moto.server`` on a free loopback port and every test talks
real HTTP to it through s3fs/botocore/aiohttp. `FaultProxy` sits between the client and moto and
answers the next N GETs of a matching object with one of the faults the project's storage layer
must survive: an S3 error status, a connection reset before any response, a body cut short, or a
body that stops in the middle while the connection stays open.

conftest.py re-exports the fixtures `s3_endpoint` (session), `s3_bucket` and `faulty_s3`.
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
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import unquote, urlsplit

import pytest

HOST = "127.0.0.1"
FAKE_KEY = "testing-key"
FAKE_SECRET = "testing-secret"
REGION = "us-east-1"


# --------------------------------------------------------------------------------------------
# moto server
# --------------------------------------------------------------------------------------------


@dataclass
class S3Endpoint:
    """A running moto S3 server; setup through it (buckets, uploads) never meets a fault."""

    url: str
    process: subprocess.Popen

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=FAKE_KEY,
                            aws_secret_access_key=FAKE_SECRET, region_name=REGION,
                            config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))

    def make_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.url, key=FAKE_KEY, secret=FAKE_SECRET,
                                 client_kwargs={"region_name": REGION}, skip_instance_cache=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_until_answers(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no *_proxy from the environment
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited early with code {process.returncode}")
        with contextlib.suppress(OSError):
            with opener.open(url + "/moto-api/", timeout=2):
                return
        time.sleep(0.1)
    raise TimeoutError(f"moto server at {url} did not answer within {timeout} s")


def _stop_process_group(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the server's process group (it runs in a session of its own), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)


@contextlib.contextmanager
def moto_server(startup_timeout: float = 30, attempts: int = 3) -> Iterator[S3Endpoint]:
    with tempfile.TemporaryFile() as log:
        for attempt in range(attempts):  # a free port can be taken between probing and binding
            url = f"http://{HOST}:{_free_port()}"
            process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", url.rsplit(":", 1)[1]],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                _wait_until_answers(url, process, startup_timeout)
                break
            except (RuntimeError, TimeoutError):
                _stop_process_group(process)
                if attempt == attempts - 1:
                    log.seek(0)
                    raise RuntimeError(f"could not start moto server:\n{log.read()[-4000:].decode(errors='replace')}")
        try:
            yield S3Endpoint(url, process)
        finally:
            _stop_process_group(process)


def without_aws_environment(mp: pytest.MonkeyPatch) -> None:
    """No credentials, profile, endpoint or config file from the caller's environment, and no instance
    metadata lookup: the tests see what a machine without AWS set up sees, whatever the developer has."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        mp.setenv(name, os.path.join(os.path.dirname(__file__), "no-such-aws-file"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """A moto S3 server for the whole session, with fake credentials (and no ~/.aws) in the environment."""
    no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY"), HOST, "localhost") if x)
    with pytest.MonkeyPatch.context() as mp:
        without_aws_environment(mp)
        for name, value in {"AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                            "AWS_DEFAULT_REGION": REGION, "NO_PROXY": no_proxy, "no_proxy": no_proxy}.items():
            mp.setenv(name, value)
        with moto_server() as endpoint:
            yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> str:
    """A fresh bucket (not deleted afterwards: the server ends with the session)."""
    return s3_endpoint.make_bucket()


# --------------------------------------------------------------------------------------------
# Fault proxy
# --------------------------------------------------------------------------------------------

ERROR = "slowdown"   # an S3 XML error with the rule's status, not forwarded (counted under "slowdown")
RESET = "reset"      # TCP RST before any response
TRUNCATE = "truncate"  # the real headers (full Content-Length), part of the body, then a clean close
STALL = "stall"      # the real headers, part of the body, then silence on an open connection
PASSED = "passed"

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


@dataclass
class Fault:
    kind: str
    remaining: int | None  # None: every matching request until clear()
    match: str | None
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    fraction: float = 0.5  # TRUNCATE / STALL: the share of the body sent
    stall_s: float = 60.0  # STALL: silent this long, or until the proxy stops

    def hits(self, method: str, path: str) -> bool:
        """A GET of an object (path-style /bucket/key: not a listing, not a HEAD) whose path holds `match`."""
        if method != "GET" or self.remaining == 0:
            return False
        bucket_key = urlsplit(path).path.lstrip("/").split("/", 1)
        if len(bucket_key) < 2 or not bucket_key[1]:
            return False
        return self.match is None or self.match in unquote(path)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    proxy: "FaultProxy"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end after this
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - keep pytest's output clean
        pass

    def setup(self):
        super().setup()
        self.server.proxy._track(self.connection, add=True)

    def finish(self):
        with contextlib.suppress(OSError):
            super().finish()
        self.server.proxy._track(self.connection, add=False)

    def do_GET(self):
        try:
            self._handle()
        except (ConnectionError, TimeoutError):  # the client went away
            self.close_connection = True

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";", 1)[0].strip(), 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    def _forward(self, body: bytes):
        upstream = urlsplit(self.server.proxy.upstream)
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # Host passes unchanged: SigV4 signed it
                if name.lower() not in _HOP_BY_HOP | {"content-length", "expect"}:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command != "HEAD" and response.status not in (204, 304):
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(data))))
            return response.status, response.reason, headers, data
        finally:
            conn.close()

    def _send_head(self, status: int, reason: str, headers):
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()

    def _reset(self):
        """Abort the connection with a TCP RST: SO_LINGER 0, then close without a shutdown."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.rfile.close()  # drop makefile()'s reference, so close() really closes
        self.connection.close()

    def _handle(self):
        proxy = self.server.proxy
        body = self._read_body()
        fault = proxy._take(self.command, self.path)
        if fault is not None and fault.kind == ERROR:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.code}</Code><Message>'
                   f"{fault.message}</Message><Resource>{unquote(urlsplit(self.path).path)}</Resource>"
                   f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>").encode()
            proxy._count(ERROR)  # before answering, so a client that got its answer sees the count
            self._send_head(fault.status, http.HTTPStatus(fault.status).phrase,
                            [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))])
            self.wfile.write(xml)
            return
        if fault is not None and fault.kind == RESET:
            proxy._count(RESET)
            self._reset()
            return
        status, reason, headers, data = self._forward(body)
        if fault is None:
            proxy._count(PASSED)
            self._send_head(status, reason, headers)
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        proxy._count(fault.kind)  # TRUNCATE or STALL: the real headers, then part of the body
        self._send_head(status, reason, headers)
        self.wfile.write(data[:max(0, min(int(len(data) * fault.fraction), len(data) - 1))])
        self.wfile.flush()
        if fault.kind == STALL:
            proxy._stopping.wait(fault.stall_s)
        self.close_connection = True


class FaultProxy:
    """A loopback HTTP proxy in front of an S3 endpoint that injects faults on demand.

    Each of `error` / `slowdown`, `reset`, `truncate` and `stall` applies to the next `n` GETs of an
    object whose path contains `match` (n=None: all of them until `clear()`); listings and HEADs pass.
    The first live rule in the order they were added wins. `counts` maps "slowdown" (any error
    status), "reset", "truncate", "stall" and "passed" to how many requests got that treatment.
    """

    def __init__(self, endpoint: S3Endpoint):
        self.endpoint = endpoint
        self.upstream = endpoint.url
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._counts = dict.fromkeys((ERROR, RESET, TRUNCATE, STALL, PASSED), 0)
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()  # wakes stalled handlers
        self._server = _Server((HOST, 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="FaultProxy", daemon=True)
        self.url = f"http://{HOST}:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:  # wake handlers blocked on idle keep-alive connections
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def _add(self, kind: str, n: int | None, match: str | None, **how) -> None:
        with self._lock:
            self._faults.append(Fault(kind, n, match, **how))

    def error(self, n: int | None = 1, match: str | None = None, status: int = 503, code: str = "SlowDown",
              message: str = "Please reduce your request rate.") -> None:
        """An S3-style XML error (`status`, `code`) instead of the object."""
        self._add(ERROR, n, match, status=status, code=code, message=message)

    def slowdown(self, n: int | None = 1, match: str | None = None) -> None:
        self.error(n, match)

    def reset(self, n: int | None = 1, match: str | None = None) -> None:
        """The connection reset before any response."""
        self._add(RESET, n, match)

    def truncate(self, n: int | None = 1, match: str | None = None, fraction: float = 0.5) -> None:
        """The full Content-Length announced, `fraction` of the body sent, then a clean close."""
        self._add(TRUNCATE, n, match, fraction=fraction)

    def stall(self, n: int | None = 1, match: str | None = None, fraction: float = 0.5,
              stall_s: float = 60.0) -> None:
        """The full Content-Length announced, `fraction` of the body sent, then nothing for `stall_s`
        seconds (or until the proxy stops) while the connection stays open."""
        self._add(STALL, n, match, fraction=fraction, stall_s=stall_s)

    def clear(self) -> None:
        """Drop every pending fault (the counts stay)."""
        with self._lock:
            self._faults.clear()

    @property
    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    @property
    def injected(self) -> int:
        """Faults injected so far, of every kind."""
        counts = self.counts
        return sum(counts[kind] for kind in (ERROR, RESET, TRUNCATE, STALL))

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.hits(method, path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    def _count(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(sock)


@pytest.fixture
def faulty_s3(s3_endpoint: S3Endpoint) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's moto server; `.endpoint` reaches moto directly."""
    with FaultProxy(s3_endpoint) as proxy:
        yield proxy
