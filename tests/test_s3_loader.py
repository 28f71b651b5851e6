"""Shards written to and streamed from a real S3 endpoint (moto's server), with injected faults."""

import re

import pytest

from pixeldit.data_pipelines.lanes import LoaderSpec
from pixeldit.data_pipelines.loader import ShardLoader
from pixeldit.data_pipelines.manifest import load_manifest
from pixeldit.data_pipelines.source import Split
from pixeldit.storage import StorageTimeout
from pixeldit.data_pipelines.verify import verify_shards
from pixeldit.data_pipelines.writer import list_image_folder, write_shards


@pytest.fixture
def s3_shards(s3_endpoint, s3_bucket, photo_shards):
    items, classes = list_image_folder(str(photo_shards["src"]))
    url = f"s3://{s3_bucket}/imagenet-like/train"
    options = {"endpoint_url": s3_endpoint.url}
    write_shards(items, classes, url, shard_samples=5, seed=1, options=options, progress=False)
    return url


def loader_for(url, endpoint, decoder="pil", workers=0, io_timeout_s=120.0):
    options = {"endpoint_url": endpoint, "io_timeout_s": io_timeout_s}
    manifest = load_manifest(url, options)
    spec = LoaderSpec(manifest, url, 32, 4, 0, Split(1, 0, max(1, workers), 4), 16, False, options)
    return ShardLoader(spec, decoder, workers)


def indices(loader):
    return [i for batch in loader for i in batch["index"].tolist()]


def test_write_to_s3_and_read_back_through_both_decoders(s3_endpoint, s3_shards, photo_shards):
    options = {"endpoint_url": s3_endpoint.url}
    manifest = load_manifest(s3_shards, options)
    assert manifest.num_samples == photo_shards["made"]["images"]
    assert verify_shards(s3_shards, options, progress=False) == []
    local = loader_for(photo_shards["root"], None)  # same photos, written locally with the same seed
    pil = loader_for(s3_shards, s3_endpoint.url, "pil", workers=2)
    dali = loader_for(s3_shards, s3_endpoint.url, "dali", workers=2)  # two read lanes, as the pil workers
    keys_pil = [k for b in pil for k in b["key"]]
    keys_dali = [k for b in dali for k in b["key"]]
    assert keys_pil == keys_dali
    assert sorted(keys_pil) == sorted(k for b in local for k in b["key"])


def test_faults_are_retried_without_duplicates_or_losses(s3_endpoint, s3_shards, faulty_s3):
    expected = indices(loader_for(s3_shards, s3_endpoint.url))
    names = [s.name for s in load_manifest(s3_shards, {"endpoint_url": s3_endpoint.url}).shards]
    # 503 SlowDown and resets are retried inside the S3 client (aiohttp's own first retry of a reset
    # is invisible); a body cut short reaches our reader, which reopens mid-shard and continues
    faulty_s3.slowdown(n=3, match=names[0])
    faulty_s3.reset(n=2, match=names[1])
    faulty_s3.truncate(n=3, match=names[2], fraction=0.4)
    loader = loader_for(s3_shards, faulty_s3.url)
    got = indices(loader)
    assert got == expected  # every kept sample exactly once, in the same order
    assert faulty_s3.counts["slowdown"] == 3 and faulty_s3.counts["truncate"] == 3
    assert loader.stats.retries >= faulty_s3.counts["slowdown"] + faulty_s3.counts["truncate"]


def test_a_shard_that_keeps_failing_is_named_never_skipped(s3_endpoint, s3_shards, faulty_s3):
    name = load_manifest(s3_shards, {"endpoint_url": s3_endpoint.url}).shards[1].name
    faulty_s3.truncate(n=None, match=name, fraction=0.3)
    # an access failure is not content to skip: the epoch stops at the deadline, naming the shard
    with pytest.raises(StorageTimeout, match=f"{name}: still failing after .*data.io_timeout_s=2") as e:
        indices(loader_for(s3_shards, faulty_s3.url, io_timeout_s=2))
    # no attempt starts past the deadline; one already running may end a little after it on a loaded machine
    assert float(re.search(r"attempts in ([\d.]+) s", str(e.value)).group(1)) <= 2 + 1.5
    assert "\n" not in str(e.value) and faulty_s3.counts["truncate"] >= 2
