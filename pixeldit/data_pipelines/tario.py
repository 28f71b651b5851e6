"""WebDataset tar shards: a deterministic writer with its DALI index, and a resumable reader.

The reader parses ustar headers itself instead of going through `tarfile`: it
needs exact byte counts (a body cut short by the network must be noticed, not
read as a truncated archive) and the offset of every sample, so a failed
stream can be reopened at the first sample not yet delivered.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, NamedTuple

from ..storage import CorruptContent, TransientError

BLOCK = 512
INDEX_VERSION = "v1.2"


def split_name(name: str) -> tuple[str, str]:
    """'dir/key.cls.txt' -> ('dir/key', 'cls.txt'): the key ends at the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


class _CountingHashWriter(io.RawIOBase):
    def __init__(self, sink: BinaryIO):
        self.sink = sink
        self.bytes = 0
        self.sha256 = hashlib.sha256()
        self.discarded = False

    def writable(self):
        return True

    def write(self, data):
        if self.discarded:  # an aborted shard: tarfile's finaliser must not write into a closed sink
            return len(data)
        self.sink.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)


@dataclass
class ShardWriter:
    """Writes samples into one tar stream; tracks bytes, sha256 and the DALI index as it goes.

    Headers carry fixed mtime/owner/mode so the same samples give the same bytes
    (and checksum) on every run.
    """

    sink: BinaryIO
    entries: list[list[tuple[str, int, int, str]]] = field(default_factory=list)

    def __post_init__(self):
        self._out = _CountingHashWriter(self.sink)
        self._tar = tarfile.open(fileobj=self._out, mode="w|", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, files: dict[str, bytes]):
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must not contain a dot in its file name")
        components = []
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            if len(info.name) > 99:
                raise ValueError(f"member name {info.name!r} is longer than ustar's 99 characters")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            header_offset = self._tar.offset  # the sink lags: "w|" buffers in 10 KiB records
            self._tar.addfile(info, io.BytesIO(data))
            components.append((ext, header_offset + BLOCK, len(data), info.name))
        self.entries.append(components)

    @property
    def bytes_written(self) -> int:
        return self._out.bytes

    def close(self) -> tuple[int, str]:
        self._tar.close()
        return self._out.bytes, self._out.sha256.hexdigest()

    def discard(self):
        self._out.discarded = True

    def index_text(self) -> str:
        return index_text(self.entries)


def index_text(entries: list[list[tuple[str, int, int, str]]]) -> str:
    """A DALI (wds2idx v1.2) index: per sample, (extension, data offset, size, member name) of its members."""
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in sample) for sample in entries]
    return "\n".join(lines) + "\n"


class IndexedSample(NamedTuple):
    offset: int                                     # header offset of the sample's first member
    key: str
    members: tuple[tuple[str, int, int, bytes], ...]  # (extension, data offset, size, header name field)


def _name_field(name: str) -> bytes:
    """How a ustar header begins for this member name; empty where it cannot hold the name
    (over 99 bytes: GNU long-name entries), which sends the reader to parse the headers."""
    encoded = name.encode()
    return encoded + b"\0" if len(encoded) <= 99 else b""


class ShardIndex:
    """A shard's DALI index: the key and header offset of every sample and, for each position of a
    member in a line, the extension, data offset, size and header name field of every sample.

    Kept column by column rather than as tuples per sample and member: a lane parses the index of
    every shard it reads, every epoch, and keeps it for the epoch; the columns parse in about 2 µs
    a sample instead of 3.5 and leave no object per sample for the garbage collector to walk
    (measured, docs/benchmarks.md). Where a line lists fewer members than the widest, its places
    in the other columns hold None.
    """

    def __init__(self, keys: list[str], offsets: list[int], columns: list[tuple[list, list, list, list]]):
        self.keys, self.offsets = keys, offsets
        self.columns = columns  # (extensions, data offsets, sizes, header name fields) per member position

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, i: int) -> Iterator[tuple[str, int, int, bytes]]:
        """(extension, data offset, size, header name field) of sample `i`'s members."""
        for exts, starts, sizes, fields in self.columns:
            if exts[i] is not None:  # None: the sample lists fewer members than the widest line
                yield exts[i], starts[i], sizes[i], fields[i]

    def __getitem__(self, i: int) -> IndexedSample:
        return IndexedSample(self.offsets[i], self.keys[i], tuple(self.members(i)))


def parse_index(text: str, where: str) -> ShardIndex:
    """Every sample of a DALI (wds2idx v1.2) index file, with its members' offsets and sizes."""
    def damaged(what: str) -> CorruptContent:
        return CorruptContent(f"{where}: damaged index ({what}); check the shards with `pixeldit shards verify` "
                              f"and rewrite the index with `pixeldit shards index`")

    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("v1.") or len(lines[0].split()) != 2 or not lines[0].split()[1].isdigit():
        raise damaged(f"not a DALI webdataset index: first line {lines[:1]}")
    count = int(lines[0].split()[1])
    index = _parse_uniform(lines[1:])
    if index is None:
        samples = []
        for number, line in enumerate(lines[1:], 2):
            fields = line.split()
            if len(fields) % 4 or not fields:
                raise damaged(f"line {number} is {line[:80]!r}")
            try:
                offsets, names = list(map(int, fields[1::4])), fields[3::4]
                members = tuple(zip(fields[0::4], offsets, map(int, fields[2::4]), map(_name_field, names)))
            except ValueError:  # an offset or size that is not a number
                raise damaged(f"line {number} is {line[:80]!r}") from None
            samples.append(IndexedSample(offsets[0] - BLOCK, split_name(names[0])[0], members))
        index = _by_sample(samples)
    if len(index) != count:
        raise damaged(f"its header says {count} samples, {len(index)} listed")
    return index


def _by_sample(samples: list[IndexedSample]) -> ShardIndex:
    """The ShardIndex of samples that list different members: a sample without a member at some
    position has None in that position's columns."""
    width = max((len(sample.members) for sample in samples), default=0)
    columns = [tuple([s.members[k][field] if k < len(s.members) else None for s in samples] for field in range(4))
               for k in range(width)]
    return ShardIndex([s.key for s in samples], [s.offset for s in samples], columns)


def _parse_uniform(lines: list[str]) -> ShardIndex | None:
    """parse_index's samples, column by column, when every line lists the same number of members (as
    the writer and `shards index` write them); None otherwise, or where a number does not parse, for
    the line-by-line parse to name the line. An index is parsed once per shard and epoch by every lane
    that reads from the shard: line by line took 6 µs a sample, 1% of a pre-cropped 256² decode,
    and more than any other step of the reading thread (measured, docs/benchmarks.md)."""
    rows = list(map(str.split, lines))
    width = len(rows[0]) if rows else 4
    if not width or width % 4 or set(map(len, rows)) != {width}:
        return None
    tokens = list(itertools.chain.from_iterable(rows))
    columns = []
    try:
        for first in range(0, width, 4):
            encoded = map(str.encode, tokens[first + 3::width])
            columns.append((tokens[first::width], list(map(int, tokens[first + 1::width])),
                            list(map(int, tokens[first + 2::width])),
                            [e + b"\0" if len(e) <= 99 else b"" for e in encoded]))  # as _name_field
    except ValueError:
        return None
    names = tokens[3::width]
    keys = [split_name(name)[0] for name in names]
    return ShardIndex(keys, [offset - BLOCK for offset in columns[0][1]], columns)


class DamagedSample(dict):
    """Stands for the files of a sample the reader could not cut out of its shard.

    An empty mapping at the position the sample would have taken in the batch: the loader skips
    it and names it under `reason`, and the reader goes on with the next sample.
    """
    reason = "corrupt_header"  # a member header is damaged where the index cannot stand in for it

    def __init__(self, detail: str):
        super().__init__()
        self.detail = detail


class TruncatedSample(DamagedSample):
    """A sample whose bytes end before the archive says they do: a shard cut short (a partial upload,
    a disk that filled) keeps every sample before the cut, the ones after it stand for this."""
    reason = "truncated"


class CorruptHeader(ValueError):
    """A tar header whose checksum does not match its bytes."""


def intact_samples(index: ShardIndex, size: int) -> int:
    """How many leading samples of an indexed archive lie wholly within its first `size` bytes."""
    for i in range(len(index)):
        if any(offset + length > size for _, offset, length, _ in index.members(i)):
            return i
    return len(index)


def read_exact(stream: BinaryIO, n: int, where: str) -> bytes:
    chunk = stream.read(n)
    if len(chunk) == n:
        return chunk  # the usual case, without the copy a join makes (a view stays a view)
    chunks, remaining = [chunk], n - len(chunk)
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise TransientError(f"{where}: stream ended {remaining} bytes short")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _octal(field_bytes: bytes) -> int:
    text = field_bytes.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def iter_members(stream: BinaryIO, where: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file, from the current position to the end marker."""
    pending_name = None
    while True:
        header = read_exact(stream, BLOCK, where)
        if header == b"\0" * BLOCK:
            return
        if not header_intact(header):
            raise CorruptHeader(f"{where}: corrupt tar header (checksum mismatch)")
        size = _octal(header[124:136])
        kind = header[156:157]
        data = read_exact(stream, size, where)
        pad = -size % BLOCK
        if pad:
            read_exact(stream, pad, where)
        if kind == b"L":  # GNU long name for the next member
            pending_name = data.rstrip(b"\0").decode()
            continue
        if kind not in (b"0", b"\0"):
            continue
        name = pending_name or (header[345:500].rstrip(b"\0") + b"/" if header[345] else b"").decode() + \
            header[:100].rstrip(b"\0").decode()
        pending_name = None
        yield name, data


def header_intact(header) -> bool:
    # ustar checksum: the unsigned byte sum with the checksum field read as spaces (tarfile's
    # calc_chksums also computes the signed variant, twice the work on the hot path)
    return sum(header[:148]) + 256 + sum(header[156:]) == _octal(header[148:156])


def slice_sample(chunk: memoryview, base: int, index: ShardIndex, i: int) -> tuple[str, dict[str, memoryview]] | None:
    """Sample `i`'s files as views into `chunk` (bytes from offset `base`), located by the index.

    Views, not copies: a copy of every image costs as much as reading it (~5 µs per 256² JPEG),
    and the chunk is freed with the last sample that refers to it. None when a member's intact
    header carries another name than the index gives (an index that does not belong to this
    archive) or the index has no name for it (GNU long names): the caller parses the headers
    instead. A header that fails its checksum (a flipped bit) does not stop the index from
    locating the data when the index is sound around it: the sample's members follow each other
    exactly as ustar lays them out; otherwise the sample comes back as a DamagedSample.
    """
    files = {}
    damaged = None
    for exts, offsets, sizes, names in index.columns:  # index.members(i), without a generator per sample
        ext = exts[i]
        if ext is None:
            continue
        offset, size, name = offsets[i], sizes[i], names[i]
        header = offset - BLOCK - base
        if not name:
            return None
        if chunk[header:header + len(name)] != name:
            if header < 0 or header_intact(bytes(chunk[header:header + BLOCK])):
                return None
            damaged = f"the tar header of {name[:-1].decode(errors='replace')!r} is damaged"
        files[ext] = chunk[offset - base:offset - base + size]
    if damaged is not None:
        members = tuple(index.members(i))
        laid_out = all(nxt[1] == off + size + -size % BLOCK + BLOCK
                       for (_, off, size, _), nxt in zip(members, members[1:]))
        if not laid_out or members[-1][1] + members[-1][2] > base + len(chunk):
            return index.keys[i], DamagedSample(f"{damaged} and the index does not locate the sample's members "
                                             f"consistently")
    return index.keys[i], files


def read_sample(members: Iterator[tuple[str, bytes]], count: int, where: str) -> tuple[str, dict[str, bytes]]:
    """The next sample of `count` members (the count comes from the index: no look-ahead needed)."""
    key, files = None, {}
    for _ in range(count):
        try:
            name, data = next(members)
        except StopIteration:
            raise CorruptContent(f"{where}: archive ended inside sample {key!r}; check it with "
                                 f"`pixeldit shards verify`") from None
        k, ext = split_name(name)
        if key is not None and k != key:
            raise CorruptContent(f"{where}: the index says {count} members for {key!r}, the archive has {name!r}: "
                                 f"the index belongs to another archive; check with `pixeldit shards verify`")
        key = k
        files[ext] = data
    return key, files


def iter_samples(stream: BinaryIO, where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key: (key, {extension: bytes}), for archives without an index."""
    key, files = None, {}
    for name, data in iter_members(stream, where):
        k, ext = split_name(name)
        if k != key and key is not None:
            yield key, files
            files = {}
        key = k
        files[ext] = data
    if key is not None:
        yield key, files
