"""Checkpoint directories: `<root>/step_NNNNNNNN/{engine/, ema/, rank_NNNNN.pt, meta.json}`.

`root` (`checkpoint.dir`, default <run_dir>/checkpoints) is a local folder or any
fsspec URL (s3://...). Every rank writes its parts, all ranks meet at a barrier,
then rank 0 commits and only afterwards replaces the `latest` pointer:

- local: everything is written under `step_NNNNNNNN.tmp`, meta.json goes in
  last, the folder is renamed, then `latest` is replaced by a rename.
- object storage has no atomic rename (a "rename" copies every object), so the
  parts are written in place and `meta.json` is the commit marker: it is
  written last, and a folder without it is an unfinished save. Before a folder
  is deleted or rewritten its meta.json goes first, so a half-deleted folder
  never looks complete. `latest` is one PUT: readers see the old or the new name.

A crash at any point leaves the previous checkpoint and `latest` loadable. Should
`latest` name a folder that lacks meta.json (a crashed re-save of the same step),
`latest_checkpoint` falls back to the newest complete one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from ..data_pipelines import storage

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"

# fsspec options (endpoint) per checkpoint root, set by the trainer: URLs below a registered root
# open with them, anything else with the environment's (AWS_ENDPOINT_URL, credentials)
_ROOT_OPTIONS: dict[str, dict] = {}


def register_root(root: str, options: dict | None):
    if is_remote(root):
        _ROOT_OPTIONS[root.rstrip("/")] = dict(options or {})


def is_remote(url: str) -> bool:
    return storage.protocol_of(url) != "file"


def join(base: str, *parts: str) -> str:
    return storage.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def storage_options(url: str) -> dict:
    roots = [r for r in _ROOT_OPTIONS if url == r or url.startswith(r + "/")]
    options = dict(_ROOT_OPTIONS[max(roots, key=len)]) if roots else {}
    if storage.protocol_of(url) == "s3" and "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]  # as data_pipelines.storage does, for DCP too
    return options


def _fs(url: str):
    fs = storage.filesystem(url, storage_options(url))
    # other ranks and processes write here too: a cached listing would hide their objects
    fs.invalidate_cache()
    return fs


def exists(url: str) -> bool:
    return os.path.exists(url) if not is_remote(url) else _fs(url).exists(url)


def read_text(url: str) -> str | None:
    try:
        return storage.read_bytes(url, storage_options(url)).decode()
    except FileNotFoundError:
        return None


def write_text(url: str, text: str):
    # all or nothing: one PUT on object storage, a temporary name and a rename locally
    storage.write_bytes(url, text.encode(), storage_options(url))


def save_torch(obj, url: str):
    if not is_remote(url):
        os.makedirs(os.path.dirname(url), exist_ok=True)
        torch.save(obj, url)
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    storage.write_bytes(url, buffer.getvalue(), storage_options(url))


def load_torch(url: str, **kwargs):
    if not is_remote(url):
        return torch.load(url, **kwargs)
    return torch.load(io.BytesIO(storage.read_bytes(url, storage_options(url))), **kwargs)


def remove(url: str):
    """Delete a checkpoint folder, its meta.json first: a folder half deleted must not look complete."""
    if not is_remote(url):
        shutil.rmtree(url, ignore_errors=True)
        return
    fs = _fs(url)
    if fs.exists(join(url, META)):
        fs.rm_file(join(url, META))
    if fs.exists(url):
        fs.rm(url, recursive=True)


def dcp_save(state: dict, url: str):
    import torch.distributed.checkpoint as dcp
    if is_remote(url):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        dcp.save(state, storage_writer=FsspecWriter(url, **storage_options(url)))
    else:
        dcp.save(state, checkpoint_id=url)


def dcp_load(state: dict, url: str):
    import torch.distributed.checkpoint as dcp
    if is_remote(url):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
        dcp.load(state, storage_reader=FsspecReader(url, **storage_options(url)))
    else:
        dcp.load(state, checkpoint_id=url)


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
    fs, base = _fs(url), storage.strip_protocol(url).rstrip("/")
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
            storage.with_retries(url, lambda: fs.get(remote, files))
        yield local
        if upload:
            files = [os.path.join(d, n) for d, _, names in os.walk(local) for n in names]
            storage.with_retries(url, lambda: fs.put(files, [f"{base}/{os.path.relpath(f, local)}" for f in files]))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------- the checkpoint folder

def step_dir(root: str, step: int) -> str:
    return join(root, f"step_{step:08d}")


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _step_folders(root: str) -> list[str]:
    if not is_remote(root):
        names = os.listdir(root) if os.path.isdir(root) else []
    else:
        fs = _fs(root)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    return sorted(n for n in names if n.startswith("step_") and not n.endswith(".tmp"))


def latest_checkpoint(root: str) -> str | None:
    """The complete checkpoint `latest` names (or the newest complete one), None when there is none."""
    pointer = join(root, LATEST)
    name = read_text(pointer)
    if name is None:
        return None
    path = join(root, name.strip())
    if exists(join(path, META)):
        return path
    complete = [n for n in _step_folders(root) if exists(join(root, n, META))]
    if not complete:
        raise FileNotFoundError(f"{pointer} names {name.strip()}, which is not a complete checkpoint "
                                f"(no {META}), and {root} holds no other")
    log.warning("%s names %s, which is not a complete checkpoint (no %s; a save crashed): using %s",
                pointer, name.strip(), META, complete[-1])
    return join(root, complete[-1])


def save_checkpoint(root: str, step: int, rank: int, *, strategy, ema, rank_state: dict, meta: dict,
                    keep_last: int) -> str:
    """Collective: every rank calls it at the same step boundary."""
    final = step_dir(root, step)
    work = final if is_remote(root) else final + ".tmp"
    if rank == 0:
        remove(work)  # a crashed save's leftovers (or, on object storage, this step's earlier save)
        if not is_remote(root):
            os.makedirs(work)
    barrier()
    strategy.save(join(work, "engine"))
    ema.save(join(work, "ema"), rank)
    save_torch(rank_state, join(work, f"rank_{rank:05d}.pt"))
    barrier()
    if rank == 0:
        write_text(join(work, META), json.dumps(meta | {"saved_at": time.time()}, indent=1))
        if not is_remote(root):
            if os.path.exists(final):  # a re-save of the same step (a run resumed from an earlier one)
                shutil.rmtree(final)
            os.replace(work, final)
        write_text(join(root, LATEST), f"step_{step:08d}")
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: str, keep_last: int):
    names = _step_folders(root)
    complete = [n for n in names if exists(join(root, n, META))]
    # folders without meta.json are crashed saves of an abandoned timeline: removed with the old ones
    keep = set(complete[-keep_last:]) | {read_text(join(root, LATEST)).strip()}
    for name in names:
        if name not in keep:
            remove(join(root, name))


def read_meta(path: str) -> dict:
    text = read_text(join(path, META))
    if text is None:
        raise FileNotFoundError(f"{join(path, META)} is missing: not a complete checkpoint")
    return json.loads(text)


def load_rank_state(path: str, rank: int) -> dict:
    file = join(path, f"rank_{rank:05d}.pt")
    if not exists(file):
        raise FileNotFoundError(f"{file} is missing: the checkpoint was written by a smaller world")
    return load_torch(file, map_location="cpu", weights_only=False)
