"""The object-storage test helpers work, and how s3fs 2026.9.0 reacts to each injected fault.

Everything here is real: moto's S3 server in a subprocess, a real loopback proxy, real
s3fs/aiobotocore/aiohttp clients. What these tests pin down (s3fs 2026.9.0, aiobotocore
3.x, aiohttp 3.14, botocore "standard" retries with max_attempts=3, i.e. 4 attempts):

* 503 SlowDown: botocore retries it; s3fs's own wrapper retries it again (it matches
  "SlowDown"). Persistent: ``OSError(errno.EBUSY, "Please reduce your request rate.")``
  whose ``__cause__`` is ``botocore.exceptions.ClientError`` (5 s3fs x 4 botocore = 20 GETs).
* Connection reset before any response: aiohttp itself retries an idempotent request once,
  so a single reset is invisible; then botocore retries. Persistent: raises
  ``botocore.exceptions.EndpointConnectionError`` ("Could not connect to the endpoint URL",
  even though it connected) -- not an OSError, and s3fs does not retry it.
* Connection reset after the headers, and a body cut short (correct Content-Length, fewer
  bytes, then close): ``resp["Body"].read()`` raises ``aiohttp.ClientPayloadError``
  ("Response payload is not completed: <ContentLengthError ...>"), which s3fs retries
  (S3FileSystem.retries = 5 GETs in all). A single fault is cured silently; a persistent one
  raises ``aiohttp.ClientPayloadError`` (not an OSError). s3fs never returns short data.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import aiohttp
import botocore.exceptions
import fsspec
import pytest

try:  # works once `tests` is importable as a package (tests/__init__.py or pythonpath=["."])
    from tests.s3_server import (  # noqa: F401 - fixtures are used by name
        FaultProxy, _stop_process_group, faulty_s3, is_object_path, s3_bucket, s3_endpoint)
except ImportError:  # pytest's default "prepend" import mode puts tests/ itself on sys.path
    from s3_server import (  # noqa: F401
        FaultProxy, _stop_process_group, faulty_s3, is_object_path, s3_bucket, s3_endpoint)

MB = 2**20


@pytest.fixture(scope="module")
def big():
    return os.urandom(3 * MB)


def _put(endpoint, bucket, key, data):
    """Write through the direct endpoint (never faulted)."""
    endpoint.client().put_object(Bucket=bucket, Key=key, Body=data)
    return f"{bucket}/{key}"


# ---------------------------------------------------------------------------------- plumbing


def test_is_object_path():
    assert is_object_path("/b/shard-000001.tar")
    assert is_object_path("/b/dir/x.bin?versionId=3")
    assert not is_object_path("/b?list-type=2&prefix=")
    assert not is_object_path("/b/")
    assert not is_object_path("/b/key?uploadId=abc")   # ListParts
    assert not is_object_path("/b/key?tagging")


def test_endpoint_storage_options_work_with_fsspec(s3_endpoint, s3_bucket):
    assert s3_endpoint.url.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ACCESS_KEY_ID"] and os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    opts = s3_endpoint.storage_options
    assert opts["endpoint_url"] == s3_endpoint.url and opts["key"] and opts["secret"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
    fs.pipe_file(f"{s3_bucket}/a/b.txt", b"hello")
    with fsspec.open(f"s3://{s3_bucket}/a/b.txt", "rb", **opts) as f:
        assert f.read() == b"hello"
    assert fs.ls(f"{s3_bucket}/a") == [f"{s3_bucket}/a/b.txt"]
    # buckets are unique per call
    assert s3_endpoint.make_bucket() != s3_endpoint.make_bucket()


def test_write_direct_read_through_proxy(faulty_s3, s3_bucket, big):
    path = _put(faulty_s3.endpoint, s3_bucket, "shard-000000.tar", big)
    fs = faulty_s3.filesystem()
    assert faulty_s3.url != faulty_s3.endpoint.url
    assert fs.cat_file(path) == big
    assert fs.cat_file(path, start=10, end=1000) == big[10:1000]   # Range request, 206
    assert fs.ls(s3_bucket) == [path]                              # ListObjectsV2
    assert fs.info(path)["size"] == len(big)                       # HEAD
    c = faulty_s3.counts
    assert c["passed"] >= 4 and faulty_s3.injected == 0
    assert {r.status for r in faulty_s3.requests("GET", "shard-000000")} >= {200, 206}


def test_multipart_upload_through_proxy(faulty_s3, s3_bucket):
    """POST/PUT bodies (and Expect: 100-continue) survive the proxy."""
    data = os.urandom(6 * MB)
    fs = faulty_s3.filesystem()
    with fs.open(f"{s3_bucket}/mpu.bin", "wb", block_size=5 * MB) as f:
        f.write(data)
    assert {r.method for r in faulty_s3.records} >= {"POST", "PUT"}
    body = faulty_s3.endpoint.client().get_object(Bucket=s3_bucket, Key="mpu.bin")["Body"].read()
    assert body == data


def test_faults_only_hit_matching_object_gets(faulty_s3, s3_bucket):
    other = _put(faulty_s3.endpoint, s3_bucket, "shard-000002.tar", b"x" * 1000)
    target = _put(faulty_s3.endpoint, s3_bucket, "shard-000001.tar", b"y" * 1000)
    # botocore retries off: every fault reaches s3fs; s3fs retries "SlowDown" itself (0.1 s)
    fs = faulty_s3.filesystem(config_kwargs={"retries": {"max_attempts": 0}})
    faulty_s3.slowdown(1, match="shard-000001")
    assert fs.ls(s3_bucket) and fs.info(target)["size"] == 1000   # LIST and HEAD: untouched
    assert fs.cat_file(other) == b"x" * 1000                      # other key: untouched
    assert faulty_s3.injected == 0 and faulty_s3.pending == 1
    assert fs.cat_file(target) == b"y" * 1000                     # faulted once, retried by s3fs
    assert faulty_s3.counts["slowdown"] == 1 and faulty_s3.pending == 0
    assert [r.action for r in faulty_s3.requests("GET", "shard-000001")] == ["slowdown", "passed"]


def test_slowdown_is_s3_style_xml(faulty_s3, s3_bucket):
    import boto3
    from botocore.config import Config

    _put(faulty_s3.endpoint, s3_bucket, "k", b"v")
    client = boto3.client("s3", endpoint_url=faulty_s3.url, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 0, "mode": "standard"}))
    faulty_s3.slowdown(1)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        client.get_object(Bucket=s3_bucket, Key="k")
    assert e.value.response["Error"]["Code"] == "SlowDown"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"


# ---------------------------------------------------------------------------------- faults


def test_slowdown_twice_is_retried_by_botocore(faulty_s3, s3_bucket, big):
    path = _put(faulty_s3.endpoint, s3_bucket, "shard-000001.tar", big)
    faulty_s3.slowdown(2, match="shard-000001")
    fs = faulty_s3.filesystem()
    with fs.open(path, "rb", cache_type="none") as f:
        assert f.read() == big
    assert faulty_s3.counts["slowdown"] == 2
    assert [r.status for r in faulty_s3.requests("GET")] == [503, 503, 206]


def test_cut_body_once_is_retried_by_s3fs(faulty_s3, s3_bucket, big):
    path = _put(faulty_s3.endpoint, s3_bucket, "shard-000001.tar", big)
    faulty_s3.truncate(1, fraction=0.5)
    fs = faulty_s3.filesystem()
    # cache_type="none": one GET for the whole body
    assert fs.open(path, "rb", cache_type="none").read() == big
    assert faulty_s3.counts["truncate"] == 1
    assert [r.action for r in faulty_s3.requests("GET")] == ["truncate", "passed"]


def test_cut_body_persistent_raises_client_payload_error(faulty_s3, s3_bucket, big):
    path = _put(faulty_s3.endpoint, s3_bucket, "shard-000001.tar", big)
    faulty_s3.truncate(None, nbytes=MB)
    fs = faulty_s3.filesystem()
    assert fs.retries == 5  # the default; lowered below only to keep the test short
    fs.retries = 3
    # s3fs reads the body inside its retry wrapper; after `fs.retries` short bodies it
    # re-raises aiohttp.ClientPayloadError (ContentLengthError: "Not enough data to satisfy
    # content length header (received 1048576 of 3145728 bytes)"). Not an OSError, and
    # never silently short data.
    with pytest.raises(aiohttp.ClientPayloadError, match="content length") as e:
        fs.open(path, "rb", cache_type="none").read()
    assert not isinstance(e.value, OSError)
    assert faulty_s3.counts["truncate"] == 3


def test_reset_before_response(faulty_s3, s3_bucket, big):
    path = _put(faulty_s3.endpoint, s3_bucket, "shard-000001.tar", big)
    fs = faulty_s3.filesystem(config_kwargs={"retries": {"max_attempts": 0}})
    # one reset: aiohttp retries an idempotent request once by itself -> invisible
    faulty_s3.reset(1)
    assert fs.cat_file(path) == big
    assert faulty_s3.counts["reset"] == 1
    # persistent, botocore retries off: aiohttp's own retry + nothing else; s3fs does not
    # retry EndpointConnectionError (it is not an HTTPClientError)
    faulty_s3.reset(None)
    with pytest.raises(botocore.exceptions.EndpointConnectionError) as e:
        fs.cat_file(path)
    assert not isinstance(e.value, OSError)
    assert faulty_s3.counts["reset"] == 1 + 2


def test_reset_after_headers(faulty_s3, s3_bucket, big):
    path = _put(faulty_s3.endpoint, s3_bucket, "shard-000001.tar", big)
    fs = faulty_s3.filesystem()
    faulty_s3.reset(1, after_headers=True)
    assert fs.open(path, "rb", cache_type="none").read() == big      # retried by s3fs
    faulty_s3.clear()
    faulty_s3.reset(None, after_headers=True)
    fs.retries = 2  # keep the test short: 2 attempts instead of 5
    with pytest.raises(aiohttp.ClientPayloadError, match="Connection reset"):
        fs.open(path, "rb", cache_type="none").read()
    assert faulty_s3.counts["reset"] == 1 + 2


# ---------------------------------------------------------------------------------- teardown


def test_proxy_stops_and_frees_its_threads(s3_endpoint, s3_bucket):
    with FaultProxy(s3_endpoint.url) as proxy:
        port = proxy.port
        fs = proxy.filesystem()
        fs.pipe_file(f"{s3_bucket}/k", b"v")
        assert fs.cat_file(f"{s3_bucket}/k") == b"v"
        # s3fs keeps a pooled keep-alive connection, so a handler thread is still waiting
        assert proxy.open_connections >= 1 and len(proxy.threads) >= 2
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    assert not proxy.running and proxy.open_connections == 0 and proxy.threads == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_moto_runs_in_its_own_process_group_and_the_group_is_killed(s3_endpoint):
    proc = s3_endpoint.process
    assert proc.poll() is None and os.getpgid(proc.pid) == proc.pid
    # the same teardown, on a stand-in whose child would outlive a plain kill of the parent
    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
                               "print(p.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True)
    grandchild = int(child.stdout.readline())
    _stop_process_group(child, timeout=5)
    assert child.poll() is not None
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
