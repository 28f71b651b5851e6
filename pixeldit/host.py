"""The training process's host set-up: how freed memory goes back to the operating system.

glibc's malloc hands every block above its mmap threshold (128 KiB at first, raised as large
blocks are freed, at most 32 MiB) to mmap and unmaps it on free. A training step frees and
allocates the same activations and gradients every step, so each step maps fresh pages again and
pays a page fault per 4 KiB on first touch: ~300k minor faults per PixelDiT-B step on a CPU, a
tenth of its time. Keeping freed blocks in the heap (no mmap below 1 GiB, no trimming) makes the
next step reuse them; the cost is that the process keeps its peak heap, which a training process
reaches on the first step anyway.
"""

from __future__ import annotations

import ctypes
import logging

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
