"""`pixeldit shards index`: WebDataset shards written by webdataset's own ShardWriter, indexed in place
or into another folder, validated, resumed, and read back by the loader; on S3 (moto and the fault
proxy) in parallel, with a deadline, a refusal and a worker killed mid-shard."""

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from pixeldit.cli import main
from pixeldit.data_pipelines.index_shards import index_shards
from pixeldit.data_pipelines.manifest import load_manifest
from pixeldit.storage import AccessDenied, StorageTimeout
from pixeldit.data_pipelines.verify import verify_shards
from pixeldit.errors import ConfigError, DataError, MissingFileError
from pixeldit.platform.config import load_config
from tests.loaders import config_loader


def jpeg(i: int, size=(8, 8)) -> bytes:
    pixels = np.full((size[1], size[0], 3), (i * 37 % 256, i * 91 % 256, i * 53 % 256), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


NOT_A_JPEG = b"\xff\xd8\xff\xe0" + b"this is not a jpeg" * 4


def write_wds(folder: Path, samples: list[dict], per_shard: int) -> list[Path]:
    """Shards as webdataset's ShardWriter writes them (PAX headers, mtime of now, sorted members)."""
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return sorted(folder.glob("train-*.tar"))


def cls_samples(n: int, bad: dict[int, dict] = ()) -> tuple[list[dict], dict[str, int]]:
    """n samples labelled i % 5 in `.cls`; `bad` replaces members of some; the good keys with their labels."""
    samples, good = [], {}
    for i in range(n):
        sample = {"__key__": f"img{i:04d}", "jpg": jpeg(i), "cls": i % 5}
        sample.update(dict(bad).get(i, {}))
        samples.append(sample)
        if i not in dict(bad):
            good[sample["__key__"]] = i % 5
    return samples, good


def epoch(root: str, batch: int, decoder="pil", endpoint=None, classes=5) -> list[tuple[str, int]]:
    overrides = [f"data.source={root}", "data.image_size=8", f"train.global_batch={batch}", f"data.decoder={decoder}",
                 f"model.num_classes={classes}"]
    if endpoint:
        overrides.append(f"data.endpoint_url={endpoint}")
    loader = config_loader(load_config(None, overrides), 0, 1)
    return [(k, int(label)) for b in loader for k, label in zip(b["key"], b["label"].tolist())]


def wds2idx(tar: Path, out: Path) -> str:
    subprocess.run([Path(sys.executable).with_name("wds2idx"), tar, out], check=True, capture_output=True)
    return out.read_text()


def test_cls_shards_are_indexed_in_place_and_every_good_sample_trains_once(tmp_path, capsys):
    samples, good = cls_samples(14, bad={3: {"jpg": NOT_A_JPEG}, 9: {"cls": "n01440764"}, 12: {"cls": -2}})
    tars = write_wds(tmp_path / "wds", samples, per_shard=5)

    assert main(["shards", "index", str(tmp_path / "wds")]) == 0  # a folder: its *.tar files
    out = capsys.readouterr().out
    assert "11 samples in 3 shards" in out and "3 skipped (1 bad_label, 1 label_out_of_range, 1 undecodable," in out

    m = load_manifest(str(tmp_path / "wds"))
    assert [s.name for s in m.shards] == [t.name for t in tars] and m.shard_base == ""
    assert [s.samples for s in m.shards] == [4, 4, 3] and m.num_samples == len(good)
    assert m.classes == [str(i) for i in range(5)] and m.label_sources == ["cls"]
    assert (m.image.mode, m.image.size, m.image.format) == ("original", 8, "jpg")
    assert sorted((s["shard"], s["key"], s["reason"]) for s in m.skipped) == [
        ("train-000000.tar", "img0003", "undecodable"), ("train-000001.tar", "img0009", "bad_label"),
        ("train-000002.tar", "img0012", "label_out_of_range")]
    for shard, tar in zip(m.shards, tars):
        assert shard.bytes == tar.stat().st_size
    # a shard with nothing to skip gets the index DALI's own tool makes
    clean = write_wds(tmp_path / "clean", cls_samples(3)[0], per_shard=5)
    index_shards(str(tmp_path / "clean"), progress=False)
    assert (tmp_path / "clean" / "train-000000.idx").read_text() == wds2idx(clean[0], tmp_path / "z.idx")

    delivered = epoch(str(tmp_path / "wds"), batch=11)
    assert sorted(delivered) == sorted(good.items())  # every good sample once, with its label


def test_read_only_source_indexed_into_out_trains_through_both_decoders(tmp_path):
    samples, good = cls_samples(12, bad={5: {"jpg": b""}})
    write_wds(tmp_path / "src", samples, per_shard=4)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()}

    result = index_shards(str(tmp_path / "src" / "train-{000000..000002}.tar"), out=str(tmp_path / "idx"),
                          progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()} == before  # nothing written there
    m = load_manifest(str(tmp_path / "idx"))
    assert m.shard_base == str(tmp_path / "src") and result.root == str(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").glob("*.idx")) == [s.index for s in m.shards]
    assert [(s["key"], s["reason"]) for s in m.skipped] == [("img0005", "undecodable")]
    assert verify_shards(str(tmp_path / "idx"), decode=True, progress=False) == []

    pil = epoch(str(tmp_path / "idx"), batch=11)
    assert sorted(pil) == sorted(good.items())
    assert epoch(str(tmp_path / "idx"), batch=11, decoder="dali") == pil


def test_json_labels_mixed_sizes_and_a_cut_shard(tmp_path):
    samples, labels = [], {}
    for i in range(10):
        meta = {"label": (i * 3) % 7, "filename": f"n{i}.JPEG"}
        sample = {"__key__": f"img{i:04d}", "jpg": jpeg(i, (8 + i % 3, 8)), "json": meta}
        samples.append(sample)
        labels[sample["__key__"]] = meta["label"]
    samples[2]["json"] = {"filename": "no label here"}
    samples[4]["json"] = {"label": "seven"}
    tars = write_wds(tmp_path / "wds", samples, per_shard=5)
    data = tars[1].read_bytes()
    cut = len(data) // 2
    tars[1].write_bytes(data[:cut])  # an upload cut mid-shard
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        whole = {}
        for member in tar:
            key = member.name.split(".")[0]
            whole[key] = whole.get(key, True) and member.offset_data + member.size <= cut
    before_cut = {k for k, ok in whole.items() if ok}

    index_shards(str(tmp_path / "wds" / "train-"), progress=False, num_classes=7)  # a name prefix
    m = load_manifest(str(tmp_path / "wds"))
    assert m.label_sources == ["json:label"] and m.classes == [str(i) for i in range(7)]
    assert (m.image.mode, m.image.size) == ("original", None)  # sizes differ: the loader resizes each
    reasons = {(s["key"], s["reason"]) for s in m.skipped}
    assert {("img0002", "bad_label"), ("img0004", "bad_label"), (None, "truncated")} <= reasons
    assert [s["shard"] for s in m.skipped if s["reason"] == "truncated"] == ["train-000001.tar"]
    # verify checks what was indexed: the .json labels, the samples kept, the cut shard up to its cut
    assert verify_shards(str(tmp_path / "wds"), decode=True, progress=False) == []

    # the loader reads the labels from the manifest's label_sources: every sample wholly before the
    # cut is delivered once, with its .json label
    delivered = epoch(str(tmp_path / "wds"), batch=3, classes=7)
    expected = {k: v for k, v in labels.items() if k in {"img0000", "img0001", "img0003"} | before_cut}
    assert 0 < len(before_cut) < 5 and m.num_samples == len(expected)
    assert sorted(delivered) == sorted(expected.items())

    # another field, named on the command line, comes first
    for sample in samples:
        sample["json"] = {"cls": 1, **sample["json"]}
    write_wds(tmp_path / "other", samples, per_shard=5)
    other = index_shards(str(tmp_path / "other"), label_keys=["json:cls"], progress=False).manifest
    assert other.label_sources == ["json:cls"] and other.num_samples == 10 and other.classes == ["0", "1"]


def test_interrupted_index_resumes_without_rereading_finished_shards(tmp_path):
    tars = write_wds(tmp_path / "wds", cls_samples(12)[0], per_shard=3)
    root = tmp_path / "wds"
    first = index_shards(str(root), progress=False)
    assert sorted(first.read) == [t.name for t in tars] and first.reused == []
    records = {p.name: p.stat().st_mtime_ns for p in (root / "index-records").iterdir()}

    # a crash before the manifest, while shard 2 was being read: no manifest, no record for it
    (root / "manifest.json").unlink()
    (root / "index-records" / "train-000002.json").unlink()
    (root / "train-000002.idx").unlink()
    # shard 0 now holds other bytes of the same size and time: only a re-read would notice
    stat = tars[0].stat()
    tars[0].write_bytes(b"\0" * stat.st_size)
    os.utime(tars[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))

    second = index_shards(str(root), progress=False)
    assert second.read == ["train-000002.tar"] and sorted(second.reused) == [t.name for t in tars if t != tars[2]]
    assert [s.sha256 for s in second.manifest.shards] == [s.sha256 for s in first.manifest.shards]
    assert {n: t for n, t in records.items() if n != "train-000002.json"} == {
        p.name: p.stat().st_mtime_ns for p in (root / "index-records").iterdir() if p.name != "train-000002.json"}

    # a shard whose modification time moved is read again
    os.utime(tars[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert index_shards(str(root), progress=False).read == ["train-000001.tar"]


def test_brace_pattern_on_s3_in_parallel(tmp_path, s3_endpoint, s3_bucket):
    samples, good = cls_samples(10, bad={7: {"jpg": NOT_A_JPEG}})
    tars = write_wds(tmp_path / "wds", samples, per_shard=4)
    fs = s3_endpoint.filesystem()
    for tar in tars:
        fs.put_file(str(tar), f"{s3_bucket}/imagenet/{tar.name}")
    url = f"s3://{s3_bucket}/imagenet"
    options = {"endpoint_url": s3_endpoint.url}

    result = index_shards(f"{url}/train-{{000000..000002}}.tar", options=options, workers=2, progress=False)
    assert sorted(result.read) == [t.name for t in tars] and result.root == url
    m = load_manifest(url, options)
    assert m.num_samples == 9 and [(s["shard"], s["key"], s["reason"]) for s in m.skipped] == [
        ("train-000001.tar", "img0007", "undecodable")]
    assert fs.exists(f"{s3_bucket}/imagenet/train-000000.idx")
    assert sorted(epoch(url, batch=9, endpoint=s3_endpoint.url)) == sorted(good.items())


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    write_wds(tmp_path / "wds", cls_samples(4)[0], per_shard=2)
    with pytest.raises(MissingFileError, match=r"1 of 3 shards are not in .*train-000002.tar"):
        index_shards(str(tmp_path / "wds" / "train-{000000..000002}.tar"), progress=False)
    with pytest.raises(ConfigError, match="--label-key 'label'"):
        index_shards(str(tmp_path / "wds"), label_keys=["label"], progress=False)
    assert main(["shards", "index", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixeldit shards: error:") and "nothing-here" in err[0]
    # a manifest not written by `shards index` (no records beside it) is not overwritten
    (tmp_path / "wds" / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="was not written by `shards index`"):
        index_shards(str(tmp_path / "wds"), progress=False)
    (tmp_path / "wds" / "manifest.json").unlink()
    with pytest.raises(DataError, match="no sample passed the checks .*--label-key"):
        index_shards(str(tmp_path / "wds"), label_keys=["json:label"], progress=False)


@pytest.fixture
def s3_wds(tmp_path, s3_endpoint, s3_bucket):
    """Three ShardWriter shards of 4 samples on moto: (url, shard names, good samples)."""
    samples, good = cls_samples(12)
    tars = write_wds(tmp_path / "wds", samples, per_shard=4)
    fs = s3_endpoint.filesystem()
    for tar in tars:
        fs.put_file(str(tar), f"{s3_bucket}/imagenet/{tar.name}")
    return f"s3://{s3_bucket}/imagenet", [t.name for t in tars], good


def test_a_silent_shard_stops_at_the_deadline_and_a_refusal_is_one_line(s3_wds, faulty_s3):
    url, names, _ = s3_wds
    # silent halfway through a shard's body: the index stops within its deadline, naming the shard
    faulty_s3.stall(n=None, match=names[1], fraction=0.5)
    start = time.monotonic()
    with pytest.raises(StorageTimeout) as e:
        index_shards(url, options={"endpoint_url": faulty_s3.url}, io_timeout_s=2, progress=False)
    assert time.monotonic() - start < 2 + 8  # shard 0 and the listing, then the deadline
    assert str(e.value).startswith(f"{url}/{names[1]}: still failing after") and "data.io_timeout_s=2" in str(e.value)
    assert float(re.search(r"attempts in ([\d.]+) s", str(e.value)).group(1)) <= 2
    faulty_s3.clear()
    # a refusal comes through as storage typed it: the URL, the cause and the fix, once
    faulty_s3.error(n=None, match=names[2], status=403, code="AccessDenied", message="Access Denied")
    with pytest.raises(AccessDenied) as denied:
        index_shards(url, options={"endpoint_url": faulty_s3.url}, progress=False)
    text = str(denied.value)
    assert text.startswith(f"{url}/{names[2]}: access denied (HTTP 403 AccessDenied); check the credentials")
    assert text.count(names[2]) == 1 and "\n" not in text


def spawned_workers() -> list[int]:
    """Pids of this process's children that run multiprocessing's spawn entry point (pool workers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except OSError:  # gone meanwhile
            continue
        if parent == os.getpid() and b"spawn_main" in command:
            found.append(int(pid))
    return found


def test_a_worker_killed_mid_shard_stops_the_index_naming_the_shard(s3_wds, faulty_s3):
    url, names, _ = s3_wds
    # shard 1 never finishes (its body stalls); then its worker is killed, as the OOM killer would
    faulty_s3.stall(n=None, match=names[1], fraction=0.5, stall_s=30)
    outcome = {}

    def run():
        try:
            index_shards(url, options={"endpoint_url": faulty_s3.url}, workers=2, progress=False)
        except Exception as e:  # noqa: BLE001 - handed to the test's thread to assert on
            outcome["error"] = e

    indexing = threading.Thread(target=run, daemon=True)
    indexing.start()
    deadline = time.monotonic() + 60
    # wait until shard 1 is stalled and the other worker has finished shards 0 and 2 (their records are
    # written): the only shard in flight is then shard 1
    client = faulty_s3.endpoint.client()
    bucket, prefix = url[len("s3://"):].split("/", 1)
    while not (faulty_s3.counts["stall"] and client.list_objects_v2(
            Bucket=bucket, Prefix=f"{prefix}/index-records/").get("KeyCount", 0) >= 2):
        assert time.monotonic() < deadline and indexing.is_alive(), outcome
        time.sleep(0.05)
    for pid in spawned_workers():
        os.kill(pid, signal.SIGKILL)
    indexing.join(30)
    assert not indexing.is_alive(), "index_shards waits forever for a dead worker"
    text = str(outcome.get("error"))
    assert isinstance(outcome.get("error"), DataError), text
    assert text.startswith(f"{url}/{names[1]}: the worker process indexing it died") and "--workers" in text
