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

A crash at any point leaves the previous checkpoint and `latest` loadable. A checkpoint is
complete when its meta.json parses, holds the keys a resume reads, and the parts it implies
(engine/, ema/, one rank file per saving rank) are there. Should `latest` be unreadable, be
missing, or name a folder that is not complete (a crashed re-save of the same step, a damaged
file), `latest_complete` falls back to the newest complete checkpoint and logs what it skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from .. import storage
from ..errors import CheckpointError, CheckpointNotFound

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
STEP_NAME = re.compile(r"step_\d{8}")
# what a resume reads from meta.json: a file without them is a damaged or foreign one
META_KEYS = ("step", "world", "strategy", "state", "ema_updates", "model", "config")
STATE_KEYS = ("step", "updates", "skipped", "consecutive_skips")

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
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]  # as pixeldit.storage does, for DCP too
    return options


def _fs(url: str):
    fs = storage.filesystem(url, storage_options(url))
    # other ranks and processes write here too: a cached listing would hide their objects
    fs.invalidate_cache()
    return fs


def exists(url: str) -> bool:
    return os.path.exists(url) if not is_remote(url) else _fs(url).exists(url)


def read_bytes(url: str) -> bytes | None:
    try:
        return storage.read_bytes(url, storage_options(url))
    except FileNotFoundError:
        return None


def read_text(url: str) -> str | None:
    data = read_bytes(url)
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{url}: not UTF-8 text ({e.reason} at byte {e.start}): the file is damaged; "
                              f"restore or delete it") from None


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
    """Delete a checkpoint folder, its meta.json first: a folder half deleted must not look complete.
    A failure raises OSError (the caller decides whether it is fatal)."""
    if not is_remote(url):
        if not os.path.lexists(url):
            return
        try:
            os.remove(os.path.join(url, META))
        except FileNotFoundError:
            pass
        shutil.rmtree(url)
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


def _first_rank() -> bool:
    """Every rank looks for the checkpoint; one of them says what it skipped."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _listing(path: str) -> set[str] | None:
    """The names directly inside `path`, None when it is not there."""
    if not is_remote(path):
        return set(os.listdir(path)) if os.path.isdir(path) else None
    fs = _fs(path)
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return None


def _step_folders(root: str) -> list[str]:
    """step_NNNNNNNN folders under `root`, oldest first (unfinished local `.tmp` saves excluded)."""
    return sorted(n for n in _listing(root) or () if STEP_NAME.fullmatch(n))


def inspect_checkpoint(path: str) -> tuple[dict | None, str | None]:
    """(meta, None) for a complete checkpoint, else (None, what is wrong with it, naming the file)."""
    meta, problem, _ = _inspect(path)
    return meta, problem


def _inspect(path: str) -> tuple[dict | None, str | None, bool]:
    """inspect_checkpoint's answer, and whether the problem is a missing file (not a damaged one)."""
    file = join(path, META)
    data = read_bytes(file)
    if data is None:
        return None, f"{file} is missing (an unfinished save or a half-deleted folder)", True
    if not data.strip():
        return None, f"{file} is empty", False
    try:
        meta = json.loads(data.decode())
    except UnicodeDecodeError as e:
        return None, f"{file} is not UTF-8 ({e.reason} at byte {e.start})", False
    except json.JSONDecodeError as e:
        return None, (f"{file} is not valid JSON, truncated or damaged ({e.msg} at byte {e.pos} of "
                      f"{len(data)})"), False
    if not isinstance(meta, dict):
        return None, f"{file} holds a {type(meta).__name__}, not a mapping", False
    missing = [k for k in META_KEYS if k not in meta]
    if isinstance(meta.get("state"), dict):
        missing += [f"state.{k}" for k in STATE_KEYS if k not in meta["state"]]
    elif "state" in meta:
        missing.append("state as a mapping")
    if missing or not isinstance(meta.get("world"), int) or meta["world"] < 1:
        return None, (f"{file} lacks {', '.join(missing) or 'a valid world'} (damaged, or not one of our "
                      f"checkpoints)"), False
    present = _listing(path) or set()
    parts = ["engine", "ema", *(f"rank_{r:05d}.pt" for r in range(meta["world"]))]
    absent = [p for p in parts if p not in present]
    if absent:
        return None, (f"{path} lacks {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''} (its {META} says "
                      f"{meta['world']} rank(s) saved it)"), True
    return meta, None, False


def _pointer(root: str) -> tuple[str | None, str | None]:
    """(the step name `latest` holds, None) or (None, why it holds none); (None, None) without `latest`."""
    pointer = join(root, LATEST)
    data = read_bytes(pointer)
    if data is None:
        return None, None
    try:
        name = data.decode().strip()
    except UnicodeDecodeError as e:
        return None, f"{pointer} is not UTF-8 ({e.reason} at byte {e.start})"
    if not STEP_NAME.fullmatch(name):
        return None, f"{pointer} holds {name[:40]!r}, not a step_NNNNNNNN name"
    return name, None


def latest_complete(root: str) -> tuple[str, dict] | None:
    """(path, meta) of the checkpoint `latest` names, or of the newest complete one when that is not
    complete (logged, naming each file skipped); None for a fresh run (no `latest`, nothing complete).
    A `latest` with no complete checkpoint anywhere under `root` is a CheckpointNotFound."""
    name, problem = _pointer(root)
    has_pointer = name is not None or problem is not None
    skipped = [problem] if problem else []
    if name is not None:
        meta, problem = inspect_checkpoint(join(root, name))
        if meta is not None:
            return join(root, name), meta
        skipped.append(problem if exists(join(root, name)) else f"{join(root, LATEST)} names {name}, "
                       f"which is not there")
    for other in reversed(_step_folders(root)):
        if other == name:
            continue
        meta, problem = inspect_checkpoint(join(root, other))
        if meta is not None:
            if _first_rank():
                log.warning("using %s, the newest complete checkpoint, instead: %s", join(root, other),
                            "; ".join(skipped) if has_pointer else f"{join(root, LATEST)} is missing")
            return join(root, other), meta
        skipped.append(problem)
    if not skipped:
        return None  # a fresh run
    if not has_pointer:
        # the first save never completed: nothing to resume, and later saves prune these folders
        if _first_rank():
            log.warning("starting a fresh run: %s holds no complete checkpoint (%s)", root, "; ".join(skipped))
        return None
    raise CheckpointNotFound(f"{root} holds no complete checkpoint to resume ({'; '.join(skipped)}): restore the "
                             f"damaged files, or move the folder away to start a fresh run")


def latest_checkpoint(root: str) -> str | None:
    """The path `latest_complete` resumes from, None when there is none."""
    found = latest_complete(root)
    return found[0] if found else None


def save_checkpoint(root: str, step: int, rank: int, *, strategy, ema, rank_state: dict, meta: dict,
                    keep_last: int) -> str:
    """Collective: every rank calls it at the same step boundary."""
    final = step_dir(root, step)
    work = final if is_remote(root) else final + ".tmp"
    if rank == 0:
        try:
            remove(work)  # a crashed save's leftovers (or, on object storage, this step's earlier save)
        except OSError as e:
            raise CheckpointError(f"cannot clear {work} before saving step {step}: {e}; free the "
                                  f"checkpoint folder (permissions, space) and resume") from e
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
            # a re-save of the same step (a run resumed from an earlier one): meta.json goes first,
            # so a crash inside this removal leaves a folder that does not look complete
            remove(final)
            os.replace(work, final)
        write_text(join(root, LATEST), f"step_{step:08d}")
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: str, keep_last: int):
    names = _step_folders(root)
    state = {n: inspect_checkpoint(join(root, n))[1] for n in names}
    complete = [n for n in names if state[n] is None]
    # incomplete folders are crashed saves of an abandoned timeline or damaged: removed with the old ones
    keep = set(complete[-keep_last:]) | {_pointer(root)[0]}
    for name in names:
        if name in keep:
            continue
        path = join(root, name)
        if state[name] is not None:
            log.info("removing %s: not a complete checkpoint (%s)", path, state[name])
        try:
            remove(path)
        except OSError as e:
            looks_complete = exists(join(path, META))
            log.warning("could not delete the old checkpoint %s (%s: %s); %s", path, type(e).__name__, e,
                        "it still holds its meta.json and counts as a checkpoint: delete it by hand"
                        if looks_complete else "its meta.json is gone, so it is never resumed from: "
                        "delete the rest by hand or let the next save retry")


def read_meta(path: str) -> dict:
    """meta.json of the checkpoint at `path`, which must be complete: CheckpointNotFound when a file of it
    is missing, CheckpointError when one is damaged (each naming the file)."""
    meta, problem, missing = _inspect(path)
    if meta is None:
        error = CheckpointNotFound if missing else CheckpointError
        raise error(f"{path} is not a complete checkpoint: {problem}; name another step_NNNNNNNN folder, or the "
                    f"run directory to use its newest complete one")
    return meta


def load_rank_state(path: str, rank: int) -> dict:
    file = join(path, f"rank_{rank:05d}.pt")
    if not exists(file):
        raise CheckpointNotFound(f"{file} is missing: the checkpoint was written by a smaller world")
    return load_torch(file, map_location="cpu", weights_only=False)
