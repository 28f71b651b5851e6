"""`pixeldit shards index`: a manifest, DALI indexes and a skipped list for WebDataset shards
written by other tools (webdataset's ShardWriter, img2dataset, downloaded sets), so they train
without being rewritten.

Each shard is streamed once, front to back: every image is decoded as `shards write` decodes it,
every label is read, and the byte offsets of the members become the shard's DALI index. A sample
that fails (no image, an image that does not decode, no label or a bad one, the part of a shard
after a cut or a corrupt header) is left out of the index and listed with its shard, key and
reason; the loader never sees it. Shards are indexed in parallel processes. Each one's result is
recorded as soon as it is done (`index-records/<shard>.json` and the `.idx`), and a rerun reuses
every record whose shard has not changed since (same size and modification time or ETag): a run
that died, or new shards added to the prefix, cost only the shards not yet recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import BinaryIO

from tqdm import tqdm

from ..errors import ConfigError, DataError, MissingFileError
from . import images
from .manifest import MANIFEST, ImagePolicy, Manifest, ShardInfo, save_manifest
from ..storage import (
    RangedFile,
    TransientError,
    describe,
    exists,
    filesystem,
    io_timeout,
    is_local,
    join,
    protocol_of,
    read_bytes,
    strip_protocol,
    with_retries,
    write_bytes,
)
from .tario import BLOCK, index_text, iter_members, split_name

log = logging.getLogger(__name__)

# where a sample's label is looked for, in this order, when --label-key is not given: `.cls` is
# what webdataset's ImageNet sets and `shards write` use; `.json` {"label": ...} what others write
DEFAULT_LABEL_SOURCES = ("cls", "json:label", "json:cls")
RECORDS = "index-records"
READ_BLOCK = 16 * 2**20  # object-store reads: few large requests (the tar parser reads 512-byte headers)


def parse_label_sources(keys: list[str] | None) -> tuple[str, ...]:
    if not keys:
        return DEFAULT_LABEL_SOURCES
    for key in keys:
        if key != "cls" and not (key.startswith("json:") and len(key) > 5):
            raise ConfigError(f"--label-key {key!r}: expected `cls` (the .cls member, integer text) or "
                              f"`json:FIELD` (an integer field of the .json member), e.g. json:label")
    return tuple(dict.fromkeys(keys))


def label_from(files: dict[str, bytes], sources: tuple[str, ...]) -> tuple[str | None, int | None, str | None]:
    """(source used, label, problem): the first source in `sources` the sample carries decides.

    A source the sample carries but that does not hold an integer is a bad label, not a reason to
    look further: the loader, given the same sources, must read the same label from the same member.
    """
    parsed = None
    for source in sources:
        if source == "cls":
            if "cls" not in files:
                continue
            text = bytes(files["cls"]).strip()
            if not re.fullmatch(rb"-?[0-9]+", text):
                return source, None, f".cls is {text[:20]!r}, not an integer"
            return source, int(text), None
        if "json" not in files:
            continue
        if parsed is None:
            try:
                parsed = json.loads(bytes(files["json"]))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                return source, None, f".json does not parse: {e}"
        name = source[len("json:"):]
        if not isinstance(parsed, dict) or name not in parsed:
            continue
        value = parsed[name]
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            return source, None, f".json field {name!r} is {value!r}, not an integer"
        return source, value, None
    return None, None, f"none of {', '.join(sources)} in the sample ({', '.join(sorted(files))})"


def check_sample(files: dict[str, bytes], sources: tuple[str, ...], num_classes: int | None):
    """(source, label, (width, height), format) of a sample the loader can use, or (None, reason, detail)."""
    ext = next((e for e in images.IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        return None, "no_image", f"no {'/'.join(images.IMAGE_EXTENSIONS)} member ({', '.join(sorted(files))})"
    source, label, problem = label_from(files, sources)
    if problem is not None:
        return None, "bad_label", problem
    if label < 0 or num_classes is not None and label >= num_classes:
        classes = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        return None, "label_out_of_range", f"label {label} from {source}, classes are {classes}"
    try:
        size = images.decode_rgb(bytes(files[ext])).size  # the writer's test of an image
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip and list it"
        return None, "undecodable", images.failure_text(e)
    return source, label, size, ext


@dataclass(frozen=True)
class ShardJob:
    url: str                    # the shard
    name: str                   # its file name (the manifest's `name`)
    bytes: int
    version: str                # modification time or ETag when listed: a changed shard is read again
    out: str                    # where its .idx and record go
    options: dict | None
    sources: tuple[str, ...]
    num_classes: int | None

    @property
    def stem(self) -> str:
        return self.name[:-len(".tar")] if self.name.endswith(".tar") else self.name

    def settings(self) -> dict:
        return {"bytes": self.bytes, "version": self.version, "labels": list(self.sources),
                "num_classes": self.num_classes}


class HashingReader:
    """The shard read once, front to back: the position gives the index offsets, the hash the sha256."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.pos, self.sha256 = stream, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha256.update(data)
        self.pos += len(data)
        return data

    def drain(self):
        while self.read(READ_BLOCK):
            pass


def record_url(out: str, stem: str) -> str:
    return join(out, RECORDS, f"{stem}.json")


def index_shard(job: ShardJob) -> dict:
    """Read, validate and index one shard; write its .idx and its record; return the record."""
    fs = filesystem(job.url, job.options)
    path = strip_protocol(job.url)

    def attempt():
        with open(path, "rb") if is_local(job.url) else io.BufferedReader(RangedFile(fs, job.url), READ_BLOCK) as f:
            return read_shard(HashingReader(f), job)

    try:
        # a read cut by the network starts the shard again; what the file itself holds does not
        entries, record = with_retries(job.url, attempt, io_timeout(job.options))
    except FileNotFoundError:
        raise MissingFileError(f"{job.url}: the shard went missing while indexing; list the shards again "
                               f"(rerun `pixeldit shards index`)") from None
    # a refusal (AccessDenied) comes through as storage typed it: it names the URL and the fix
    write_out(job, join(job.out, f"{job.stem}.idx"), index_text(entries).encode())
    write_out(job, record_url(job.out, job.stem), json.dumps(record).encode())
    return record


def write_out(job: ShardJob, url: str, data: bytes):
    try:
        write_bytes(url, data, job.options)
    except PermissionError as e:
        raise DataError(f"{url}: cannot write here ({describe(e.__cause__ or e)}); index into a writable folder "
                        f"with --out DIR") from None


def read_shard(stream: HashingReader, job: ShardJob) -> tuple[list, dict]:
    entries: list[list[tuple[str, int, int, str]]] = []  # the DALI index of the samples kept
    skipped: list[dict] = []
    used: dict[str, int] = {}
    sizes: set[tuple[int, int]] = set()
    formats: set[str] = set()
    max_label = -1

    def close_sample(key: str, members: list, cut: str | None = None):
        nonlocal max_label
        files = {ext: data for ext, _, _, _, data in members}
        checked = check_sample(files, job.sources, job.num_classes)
        if checked[0] is None:
            _, reason, detail = checked
            if cut is not None:  # a sample the cut may have left short is lost to the cut
                reason, detail = cut, f"the shard ends before this sample is known to be whole ({detail})"
            skipped.append({"shard": job.name, "key": key, "reason": reason, "detail": detail})
            return
        source, label, size, ext = checked
        entries.append([(e, offset, length, name) for e, offset, length, name, _ in members])
        used[source] = used.get(source, 0) + 1
        sizes.add(size)
        formats.add(ext)
        max_label = max(max_label, label)

    key, members, cut = None, [], None
    try:
        for name, data in iter_members(stream, job.url):
            # iter_members yields after reading the member's data and its padding
            offset = stream.pos - len(data) - (-len(data) % BLOCK)
            k, ext = split_name(name)
            if k != key and members:
                close_sample(key, members)
                members = []
            key = k
            members.append((ext, offset, len(data), name, data))
    except TransientError as e:
        if stream.pos < job.bytes:
            raise  # the connection ended early, not the file: with_retries reads it again
        cut = ("truncated", f"the archive ends inside a member at byte {stream.pos} ({e})")
    except ValueError as e:  # a corrupt header: nothing after it can be located
        stream.drain()
        cut = ("truncated", f"{e}; nothing after it can be located")
    if members:
        close_sample(key, members, cut[0] if cut else None)
    if cut is not None:
        skipped.append({"shard": job.name, "key": None, "reason": cut[0], "detail": cut[1]})
    stream.drain()  # the end-of-archive blocks and padding: part of the bytes and the checksum
    record = {"name": job.name, "index": f"{job.stem}.idx", "samples": len(entries), "bytes": stream.pos,
              "sha256": stream.sha256.hexdigest(), "settings": job.settings(), "skipped": skipped,
              "labels": used, "max_label": max_label, "sizes": sorted(sizes)[:2], "formats": sorted(formats)}
    return entries, record


def _recorded(job: ShardJob) -> dict | None:
    """The shard's record from an earlier run, when it was made from these bytes with these settings."""
    try:
        record = json.loads(read_bytes(record_url(job.out, job.stem), job.options))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # a record cut by a crash while written (object stores): index again
        return None
    if record.get("settings") != job.settings() or not exists(join(job.out, record["index"]), job.options):
        return None
    return record


# ---------------------------------------------------------------- finding the shards

BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """`train-{000000..000099}.tar` -> the 100 names (width from the first bound, as in webdataset)."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    if int(last) < int(first):
        raise ConfigError(f"{pattern}: the range {{{first}..{last}}} is empty; write it first..last")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for i in range(int(first), int(last) + 1)
            for name in expand_braces(f"{head}{i:0{len(first)}d}{tail}")]


def list_shards(pattern: str, options: dict | None) -> tuple[str, list[tuple[str, int, str]]]:
    """(the shards' folder, [(name, bytes, version)]) for a brace pattern, a folder or a name prefix."""
    fs = filesystem(pattern, options)
    urls = expand_braces(pattern)
    folders = {url.rsplit("/", 1)[0] for url in urls}
    if len(folders) > 1:
        raise ConfigError(f"{pattern}: the shards of one set must share a folder (braces in the file name only)")
    folder = folders.pop() if "/" in pattern else "."
    if len(urls) == 1 and not urls[0].endswith(".tar"):  # a folder, or a prefix of names in one
        if fs.isdir(strip_protocol(pattern)):
            folder, prefix = pattern.rstrip("/"), ""
        else:
            prefix = pattern.rsplit("/", 1)[-1]
    else:
        prefix = None
    fs.invalidate_cache(strip_protocol(folder))  # a listing cached earlier in this process may miss new shards
    try:
        entries = with_retries(folder, lambda: fs.ls(strip_protocol(folder), detail=True), io_timeout(options))
    except FileNotFoundError:
        raise MissingFileError(f"{folder}: no such folder or bucket prefix; give the shards' folder, a name "
                               f"prefix or a brace pattern like {folder}/train-{{000000..000099}}.tar") from None
    listing = {entry["name"].rsplit("/", 1)[-1]: entry for entry in entries if entry.get("type") == "file"}
    if prefix is not None:
        names = sorted(n for n in listing if n.startswith(prefix) and n.endswith(".tar"))
        if not names:
            raise MissingFileError(f"{pattern}: no .tar files there; give the shards' folder, a name prefix "
                                   f"or a brace pattern")
    else:
        names = [url.rsplit("/", 1)[-1] for url in urls]
        missing = [n for n in names if n not in listing]
        if missing:
            raise MissingFileError(f"{pattern}: {len(missing)} of {len(names)} shards are not in {folder} "
                                   f"(first: {missing[0]}); fix the range or upload them")
    return folder, [(n, int(listing[n]["size"]), _version(listing[n])) for n in names]


def _version(entry: dict) -> str:
    for name in ("ETag", "etag", "mtime", "LastModified", "last_modified"):
        if entry.get(name) is not None:
            return str(entry[name])
    return ""


# ---------------------------------------------------------------- the whole set

@dataclass
class IndexResult:
    manifest: Manifest
    root: str                                   # where manifest.json is: the loader's data.source
    read: list[str]                             # shards read by this run
    reused: list[str]                           # shards whose earlier record was still valid


def index_shards(pattern: str, out: str | None = None, options: dict | None = None, workers: int = 0,
                 label_keys: list[str] | None = None, num_classes: int | None = None,
                 progress: bool = True, io_timeout_s: float | None = None) -> IndexResult:
    """`io_timeout_s` (else the options', else storage's default) is every read's and write's deadline."""
    if io_timeout_s is not None:
        options = {**(options or {}), "io_timeout_s": io_timeout_s}
    sources = parse_label_sources(label_keys)
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"--num-classes {num_classes}: expected 1 or more")
    folder, listed = list_shards(pattern, options)
    if protocol_of(folder) == "file":
        folder = os.path.abspath(strip_protocol(folder))
    root = folder if out is None else (os.path.abspath(out) if protocol_of(out) == "file" else out.rstrip("/"))
    if exists(join(root, MANIFEST), options) and not exists(join(root, RECORDS), options):
        # a set `shards write` made trains as it is; indexing it again would lose its class names
        raise ConfigError(f"{join(root, MANIFEST)} exists and was not written by `shards index`; the set already "
                          f"trains as it is. Index into another folder with --out DIR, or delete the manifest")
    jobs = [ShardJob(join(folder, name), name, size, version, root, options, sources, num_classes)
            for name, size, version in listed]
    records: dict[str, dict] = {}
    for job in jobs:
        record = _recorded(job)
        if record is not None:
            records[job.name] = record
    todo = [job for job in jobs if job.name not in records]
    reused, read = sorted(records), []
    if records:
        log.info("%s: %d of %d shards indexed by an earlier run, reading the other %d", pattern, len(records),
                 len(jobs), len(todo))
    bar = tqdm(total=sum(j.bytes for j in jobs), initial=sum(j.bytes for j in jobs if j.name in records),
               unit="B", unit_scale=True, desc="indexing shards", disable=not progress, smoothing=0.05)
    try:
        done = _in_processes(todo, workers) if workers > 0 and len(todo) > 1 else map(index_shard, todo)
        for record in done:
            records[record["name"]] = record
            read.append(record["name"])
            bar.update(record["bytes"])
            bar.set_postfix(skipped=sum(len(r["skipped"]) for r in records.values()), refresh=False)
    finally:
        bar.close()
    manifest = assemble(pattern, [records[job.name] for job in jobs], folder, root, num_classes)
    save_manifest(root, manifest, options)
    return IndexResult(manifest, root, read, reused)


def _in_processes(todo: list[ShardJob], workers: int):
    """The records of `todo`, indexed in `workers` spawned processes, as they complete.

    A worker killed mid-shard (the kernel's OOM killer on a huge image) breaks the executor, which
    fails every pending job at once: a multiprocessing.Pool silently replaced the worker and
    waited forever for its job. No more jobs are handed out than there are workers, so the shards
    in flight when one dies are exactly those a worker was indexing.
    """
    executor = ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn"))
    queued, running = list(reversed(todo)), {}
    try:
        while queued or running:
            while queued and len(running) < workers:
                job = queued.pop()
                running[executor.submit(index_shard, job)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                yield _result(future, running)
                del running[future]
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        # on an error (a shard denied, a deadline passed) the other workers' shards are not needed;
        # shutdown alone would let them run to their end (Python 3.14 has terminate_workers())
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            process.terminate()


def _result(future: Future, running: dict[Future, ShardJob]) -> dict:
    try:
        return future.result()
    except BrokenProcessPool:
        names = sorted(job.url for job in running.values())
        which = "it" if len(names) == 1 else "one of them"
        raise DataError(f"{' or '.join(names)}: the worker process indexing {which} died (killed by the system, "
                        f"most likely out of memory on a huge image); rerun with fewer --workers or more memory "
                        f"(shards already indexed are reused)") from None


def assemble(pattern: str, records: list[dict], folder: str, root: str, num_classes: int | None) -> Manifest:
    """The manifest of the shards' records, in the order they were listed."""
    kept = [r for r in records if r["samples"]]
    skipped = [s for r in records for s in r["skipped"]]
    if not kept:
        reasons = sorted({s["reason"] for s in skipped})
        raise DataError(f"{pattern}: no sample passed the checks ({len(skipped)} skipped: {', '.join(reasons)}; "
                        f"each with its key and reason in {join(root, RECORDS)}); if the labels are in another "
                        f"member or field, name it with --label-key")
    counts = {}
    for r in kept:
        for source, n in r["labels"].items():
            counts[source] = counts.get(source, 0) + n
    sources = [s for s in records[0]["settings"]["labels"] if s in counts]
    if num_classes is None:
        num_classes = max(r["max_label"] for r in kept) + 1
    sizes = {tuple(size) for r in kept for size in r["sizes"]}
    if any(len(r["sizes"]) > 1 for r in kept):
        sizes.add(None)
    size = next(iter(sizes)) if len(sizes) == 1 else None
    formats = {f for r in kept for f in r["formats"]}
    fmt = formats.pop() if len(formats) == 1 else "jpg"
    policy = ImagePolicy(mode="original", size=size[0] if size and size[0] == size[1] else None,
                         format={"jpeg": "jpg"}.get(fmt, fmt))
    shards = [ShardInfo(name=r["name"], index=r["index"], samples=r["samples"], bytes=r["bytes"], sha256=r["sha256"])
              for r in kept]
    return Manifest(shards=shards, classes=[str(i) for i in range(num_classes)], image=policy, skipped=skipped,
                    source=pattern, label_sources=sources, shard_base="" if folder == root else folder)


def run_index_command(args) -> int:
    result = index_shards(args.pattern, out=args.out, workers=args.workers, label_keys=args.label_key,
                          num_classes=args.num_classes, io_timeout_s=args.io_timeout)
    m = result.manifest
    reasons: dict[str, int] = {}
    for s in m.skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    print(f"{join(result.root, MANIFEST)}: {m.num_samples} samples in {len(m.shards)} shards, {len(m.classes)} "
          f"classes, labels from {', '.join(m.label_sources)}; {len(m.skipped)} skipped"
          + (f" ({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))}, listed in the manifest)"
             if reasons else "")
          + f"; {len(result.read)} shards read, {len(result.reused)} reused from earlier records")
    print(f"  train on it with --set data.source={result.root}")
    return 0
