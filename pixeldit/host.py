"""The training process's host set-up: how freed memory goes back to the operating system, and
what Python's garbage collector walks.

glibc's malloc hands every block above its mmap threshold (128 KiB at first, raised as large
blocks are freed, at most 32 MiB) to mmap and unmaps it on free. A training step frees and
allocates the same activations and gradients every step, so each step maps fresh pages again and
pays a page fault per 4 KiB on first touch: ~300k minor faults per PixelDiT-B step on a CPU, a
tenth of its time. Keeping freed blocks in the heap (no mmap below 1 GiB, no trimming) makes the
next step reuse them; the cost is that the process keeps its peak heap, which a training process
reaches on the first step anyway.

Python's cyclic garbage collector walks every object it tracks each time the oldest generation is
collected: 183k after importing torch (100-150 ms a collection on the 2-core CI machine), 327k with
PixelDiT-XL and its AdamW (199 ms), all of it holding the GIL, so the loader's reading threads and
the training loop stop together. The set-up's
objects (imports, model, optimizer, loader) live as long as the loop does; the loop freezes them
(`exempt_setup_from_collection`) so that collections walk only what the loop itself keeps alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BELOW_BYTES = 1 << 30
_NEVER_TRIM_BYTES = 2 ** 31 - 1


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; False where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators behave differently
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES) and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES))


def prepare_host(device: torch.device) -> None:
    """What `pixeldit train` sets up in its own process before building the model."""
    if device.type == "cpu" and not keep_freed_memory():
        log.debug("malloc is not glibc's: freed memory is returned as that allocator decides")


@contextlib.contextmanager
def exempt_setup_from_collection() -> Iterator[None]:
    """Within: the objects alive on entry are left out of every garbage collection.

    Garbage is collected first, so none of it is kept. On exit they are handed back to the collector:
    a set-up object that became cyclic garbage inside would otherwise never be freed. With the
    loader alone, a full collection over the set-up's objects came about every 25,000 images
    (measured, docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
