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

import json
import logging
import os
import re
import time

import torch.distributed as dist

from .. import storage
from ..errors import CheckpointError, CheckpointNotFound
from .torch_files import load_torch, save_torch

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
STEP_NAME = re.compile(r"step_\d{8}")
# what a resume reads from meta.json: a file without them is a damaged or foreign one
META_KEYS = ("step", "world", "strategy", "state", "ema_updates", "model", "config")
STATE_KEYS = ("step", "updates", "skipped", "consecutive_skips")

join = storage.path_join
exists = storage.exists_now


def read_text(url: str) -> str | None:
    data = storage.read_bytes_if_present(url)
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{url}: not UTF-8 text ({e.reason} at byte {e.start}): the file is damaged; "
                              f"restore or delete it") from None


def write_text(url: str, text: str):
    storage.write_whole(url, text.encode())


def remove(url: str):
    """Delete a checkpoint folder, its meta.json first: a folder half deleted must not look complete.
    A failure raises OSError (the caller decides whether it is fatal)."""
    storage.remove_tree(url, first=META)


# ---------------------------------------------------------------- the checkpoint folder

def step_dir(root: str, step: int) -> str:
    return join(root, f"step_{step:08d}")


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _first_rank() -> bool:
    """Every rank looks for the checkpoint; one of them says what it skipped."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _step_folders(root: str) -> list[str]:
    """step_NNNNNNNN folders under `root`, oldest first (unfinished local `.tmp` saves excluded)."""
    return sorted(n for n in storage.list_names(root) or () if STEP_NAME.fullmatch(n))


def inspect_checkpoint(path: str) -> tuple[dict | None, str | None]:
    """(meta, None) for a complete checkpoint, else (None, what is wrong with it, naming the file)."""
    meta, problem, _ = _inspect(path)
    return meta, problem


def _inspect(path: str) -> tuple[dict | None, str | None, bool]:
    """inspect_checkpoint's answer, and whether the problem is a missing file (not a damaged one)."""
    file = join(path, META)
    data = storage.read_bytes_if_present(file)
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
    present = storage.list_names(path) or set()
    parts = ["engine", "ema", *(f"rank_{r:05d}.pt" for r in range(meta["world"]))]
    absent = [p for p in parts if p not in present]
    if absent:
        return None, (f"{path} lacks {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''} (its {META} says "
                      f"{meta['world']} rank(s) saved it)"), True
    return meta, None, False


def _pointer(root: str) -> tuple[str | None, str | None]:
    """(the step name `latest` holds, None) or (None, why it holds none); (None, None) without `latest`."""
    pointer = join(root, LATEST)
    data = storage.read_bytes_if_present(pointer)
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


def save_checkpoint(root: str, step: int, rank: int, *, engine, ema, rank_state: dict, meta: dict,
                    keep_last: int) -> str:
    """Collective: every rank calls it at the same step boundary. `engine` is the strategy's
    checkpoint state (checkpoint_state.py), `ema` the ShardedEMA."""
    final = step_dir(root, step)
    work = final if storage.is_remote(root) else final + ".tmp"
    if rank == 0:
        try:
            remove(work)  # a crashed save's leftovers (or, on object storage, this step's earlier save)
        except OSError as e:
            raise CheckpointError(f"cannot clear {work} before saving step {step}: {e}; free the "
                                  f"checkpoint folder (permissions, space) and resume") from e
        if not storage.is_remote(root):
            os.makedirs(work)
    barrier()
    engine.save(join(work, "engine"))
    ema.save(join(work, "ema"), rank)
    save_torch(rank_state, join(work, f"rank_{rank:05d}.pt"))
    barrier()
    if rank == 0:
        write_text(join(work, META), json.dumps(meta | {"saved_at": time.time()}, indent=1))
        if not storage.is_remote(root):
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
