"""Open file descriptors that close themselves, numbered in one sequence for the whole process.

Its own module, free of heavy imports, because a decode process imports it (decode_processes.py):
the loader hands a decode process both its shared batch memory and the local shards it reads, as
descriptors, and the process keeps its mappings of them by these numbers.
"""

from __future__ import annotations

import itertools
import os

_ids = itertools.count()


class Descriptor:
    """An open file descriptor, closed when the last holder of this object lets go of it.

    Closed by garbage collection rather than by an owner: a thread may be passing the descriptor
    to a decode process when its reader lets go, and a number closed under it could belong to
    another file by the time it is sent.
    """

    def __init__(self, fd: int):
        self.id, self.fd = next(_ids), fd

    def __del__(self):
        os.close(self.fd)
