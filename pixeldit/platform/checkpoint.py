"""Checkpoint directories: `checkpoints/step_NNNNNNNN/{engine/, ema/, rank_NNNNN.pt, meta.json}`.

A save writes everything under `step_NNNNNNNN.tmp`, waits for every rank,
renames the folder (rank 0) and only then replaces the `latest` pointer
(a temporary file renamed over the old one). A crash at any point leaves the
previous checkpoint and its `latest` untouched; a leftover `.tmp` folder is
removed by the next save of the same step.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch
import torch.distributed as dist

LATEST = "latest"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_checkpoint(root: str) -> str | None:
    """The folder `latest` names, or None when the run has none yet."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    name = open(pointer).read().strip()
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {name}, which does not exist")
    return path


def _atomic_write(path: str, text: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str, step: int, rank: int, *, strategy, ema, rank_state: dict, meta: dict,
                    keep_last: int) -> str:
    """Collective: every rank calls it at the same step boundary."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    strategy.save(os.path.join(tmp, "engine"))
    ema.save(os.path.join(tmp, "ema"), rank)
    torch.save(rank_state, os.path.join(tmp, f"rank_{rank:05d}.pt"))
    barrier()
    if rank == 0:
        _atomic_write(os.path.join(tmp, "meta.json"), json.dumps(meta | {"saved_at": time.time()}, indent=1))
        if os.path.exists(final):  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(os.path.join(root, LATEST), os.path.basename(final))
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: str, keep_last: int):
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    keep = set(done[-keep_last:])
    latest = open(os.path.join(root, LATEST)).read().strip()
    for name in done:
        if name not in keep and name != latest:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_meta(path: str) -> dict:
    return json.loads(open(os.path.join(path, "meta.json")).read())


def load_rank_state(path: str, rank: int) -> dict:
    file = os.path.join(path, f"rank_{rank:05d}.pt")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: the checkpoint was written by a smaller world")
    return torch.load(file, map_location="cpu", weights_only=False)
