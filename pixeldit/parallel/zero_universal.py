"""A ZeRO checkpoint of one world size loaded by another: DeepSpeed's universal format, converted
once per checkpoint on rank 0 into `<engine>/universal/`, next to the native `<engine>/engine/`."""

from __future__ import annotations

import json
import time

import torch.distributed as dist

from .. import storage
from .checkpoint import read_text, remove, write_text
from .deepspeed_internals import convert_to_universal

NATIVE = "engine"             # DeepSpeed's own tag inside the engine folder
UNIVERSAL = "universal"       # engine/universal/: a ZeRO checkpoint converted for another world size
CONVERTED = "converted.json"  # written last into it: a folder without it is a crashed conversion
CONVERSION_FAILED = "failed.txt"
UNIVERSAL_WAIT_S = 6 * 3600


def _broadcast(value):
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def universal_tag(path: str, saved_world: int, rank: int, world: int) -> str:
    """Convert `path/engine` (ZeRO partitions of `saved_world` ranks) into `path/universal` unless that is
    done already; collective. Returns the tag to load."""
    target = storage.path_join(path, UNIVERSAL)
    done, failed = storage.path_join(target, CONVERTED), storage.path_join(target, CONVERSION_FAILED)
    if not _broadcast(rank == 0 and not storage.exists_now(done)):
        return UNIVERSAL
    if rank == 0:
        remove(target)  # a conversion that crashed midway, or an old failure marker
    if dist.is_initialized():
        dist.barrier()
    where = (f"{storage.path_join(path, NATIVE)}: converting a checkpoint of {saved_world} ranks to DeepSpeed's "
             f"universal format for {world}")
    if rank == 0:
        _convert(path, target, done, failed, saved_world, where)
    else:
        _wait_for(done, failed, where)
    return UNIVERSAL


def _convert(path: str, target: str, done: str, failed: str, saved_world: int, where: str):
    try:
        with storage.local_folder(storage.path_join(path, NATIVE), download=True) as source, \
                storage.local_folder(target, upload=True) as out:
            convert_to_universal(source, out)
        write_text(done, json.dumps({"from_world": saved_world}))  # last: the commit
    except Exception as e:
        # the other ranks poll for this marker: without it they would wait out UNIVERSAL_WAIT_S
        write_text(failed, f"{type(e).__name__}: {e}")
        raise RuntimeError(f"{where} failed: {type(e).__name__}: {e}") from e


def _wait_for(done: str, failed: str, where: str):
    """The other ranks poll the markers instead of waiting in a collective: converting XL's optimizer
    state on shared or object storage can outlast distributed.timeout_s and the NCCL watchdog."""
    deadline = time.monotonic() + UNIVERSAL_WAIT_S
    while not storage.exists_now(done):
        if storage.exists_now(failed):
            raise RuntimeError(f"{where} failed on rank 0: {read_text(failed)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{where}: rank 0 did not finish within {UNIVERSAL_WAIT_S} s")
        time.sleep(2.0)
