"""Persistent decode processes for the pil decoder, and the shared memory their batches land in.

Why processes and not threads: libjpeg-turbo releases the GIL while it decodes, but each image
still takes it to start, to crop and to hand back, and two decode threads on two cores lost 3-4%
of their time waiting for it (measured; see docs/benchmarks.md). A process per lane decodes with
no one to wait for. Everything else stays in the loader's threads: reading, order, retries,
resume and REPA lockstep are the same code as for the DALI decoder and the in-process path. A
process finds a batch's encoded bytes (15 KB an image pre-cropped) in a shared inbox and decodes
them into a batch buffer the loader owns; only the failures come back over its socket.

Batch buffers are memfd files (Linux): anonymous, so nothing is left behind if the trainer is
killed, and not limited by the size of /dev/shm (64 MB in a default Docker container). A
buffer's file descriptor reaches a process once, the first time that process decodes into it.

This module is what a decode process imports: numpy, Pillow and simplejpeg, but no torch.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Sequence

import numpy as np

from . import images

_segment_ids = itertools.count()


@dataclass(eq=False)
class Segment:
    """A shared buffer's file descriptor, open for as long as anyone holds this object.

    Closed by garbage collection rather than by an owner: a thread may be passing the descriptor
    to a process when the loader lets go of the buffer, and a descriptor closed under it could
    be reused by another file by the time it is sent.
    """
    id: int
    fd: int
    one_off: bool  # not kept by the pool: processes drop their mapping after decoding into it

    def __del__(self):
        os.close(self.fd)


# Where an array starts in its mapping. libjpeg-turbo writes a 256² image into a destination 16
# bytes past a 64-byte boundary 4% faster than into an aligned one, and 13% faster than 32 bytes
# past one (simplejpeg into slots of a 32 × 256² batch, measured on this project's 2-core CI
# machine: 0.346 / 0.361 / 0.397 ms). Allocations from malloc, which the decoders' own output
# arrays come from, land 16 bytes past a boundary; a fresh mapping starts on a page.
ARRAY_OFFSET = 16


def shared_array(shape: tuple[int, ...], one_off: bool = False) -> tuple[np.ndarray, Segment]:
    """A uint8 array in shared memory: the mapping lives as long as the array (or a view of it)."""
    nbytes = int(np.prod(shape))
    fd = os.memfd_create("pixeldit-batch", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, ARRAY_OFFSET + nbytes)
        memory = mmap.mmap(fd, ARRAY_OFFSET + nbytes)
    except BaseException:
        os.close(fd)
        raise
    array = np.frombuffer(memory, dtype=np.uint8, count=nbytes, offset=ARRAY_OFFSET).reshape(shape)
    return array, Segment(next(_segment_ids), fd, one_off)


class Inbox:
    """Shared memory a thread copies a batch's encoded bytes into for its process to decode.

    A pipe or socket would copy the bytes twice more (into the kernel and out again) and wake
    the process per 200 KB, which cost 15-20 µs an image between the two sides (measured); a
    memcpy into pages the process has mapped since the first batch costs about 1. It grows when
    a batch does not fit; the process drops its mapping of the old one with the next batch.
    """

    def __init__(self):
        self.array: np.ndarray | None = None
        self.segment: Segment | None = None
        self.stale: list[Segment] = []

    def fill(self, datas: Sequence[bytes]) -> list[int]:
        lengths = [len(d) for d in datas]
        needed = sum(lengths)
        if self.array is None or self.array.size < needed:
            if self.segment is not None:
                self.stale.append(self.segment)
            self.array, self.segment = shared_array((max(2 * needed, 1 << 22),))
        # memoryview slice assignment: the copy without a numpy array made and indexed per image
        # (a third less CPU per image, measured; `datas` are bytes or byte views, format "B")
        target, end = memoryview(self.array), 0
        for data, length in zip(datas, lengths):
            target[end:end + length] = data
            end += length
        return lengths


class DecodeProcess:
    """One decode process and its socket; batches are decoded in the order they are sent.

    Started as `python -c` rather than through multiprocessing: spawn would re-run the user's
    main script in the child (and fail unless it is guarded by `if __name__ == "__main__"`), and
    fork would copy a process full of threads.
    """

    def __init__(self):
        ours, theirs = socket.socketpair()  # a Unix socket: file descriptors can travel over it
        with ours, theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(theirs.fileno()), _PACKAGE_ROOT], pass_fds=(theirs.fileno(),))
            self.conn = Connection(os.dup(ours.fileno()))
        self.send_lock = threading.Lock()
        self.replies = threading.Condition()  # guards `received`: replies come back in the order jobs went out
        self.sent = self.received = 0
        self.failed = False  # the socket broke: a reply may never come, so no one may wait for one
        self.mapped: set[int] = set()  # segments this process has a mapping of
        self.idle_inboxes: list[Inbox] = []  # kept across epochs: the process keeps them mapped

    def take_inbox(self) -> Inbox:
        with self.send_lock:
            return self.idle_inboxes.pop() if self.idle_inboxes else Inbox()

    def return_inbox(self, inbox: Inbox):
        with self.send_lock:
            self.idle_inboxes.append(inbox)

    def alive(self) -> bool:
        return not self.failed and self.process.poll() is None

    def decode(self, inbox: Inbox, datas: Sequence[bytes], output: Segment, shape: tuple[int, ...], crop: bool,
               flips: Sequence[bool]) -> dict[int, str]:
        """`images.decode_batch` in the process, from `inbox` into `output` seen as an array of `shape`.

        Several threads may call this at once (each with its own inbox): the process works through
        their batches in the order they were sent, and the next one is already waiting in its
        socket when it finishes one, so it does not idle while a thread builds the batch it just
        decoded and reads the next.
        """
        lengths = inbox.fill(datas)
        try:
            with self.send_lock:
                if self.failed:
                    raise EOFError("an earlier exchange with the process failed")
                ticket, self.sent = self.sent, self.sent + 1
                new = [s for s in (inbox.segment, output) if s.id not in self.mapped]
                drop = [s.id for s in inbox.stale if s.id in self.mapped] + ([output.id] if output.one_off else [])
                self.conn.send((inbox.segment.id, lengths, output.id, shape, crop, list(flips),
                                [s.id for s in new], drop))
                for segment in new:
                    send_handle(self.conn, segment.fd, self.process.pid)
                    self.mapped.add(segment.id)
                self.mapped.difference_update(drop)
            inbox.stale.clear()
            with self.replies:
                self.replies.wait_for(lambda: self.received == ticket or self.failed)
                if self.failed:
                    raise EOFError("an earlier exchange with the process failed")
                try:
                    return self.conn.recv()
                finally:
                    self.received += 1
                    self.replies.notify_all()
        except BaseException as e:
            # half a message may have gone out, or a reply is left unread: nothing after it can be
            # trusted, so no one may wait for a reply any more and the process is replaced
            self.fail()
            if not isinstance(e, (EOFError, OSError)):
                raise
            try:  # a process that died closes its socket a moment before its exit status is there
                what = f"ended (exit code {self.process.wait(timeout=5)})"
            except subprocess.TimeoutExpired:
                what = "stopped answering"
            raise RuntimeError(f"pil decode process {self.process.pid} {what} while decoding a batch; the "
                               f"loader starts a new one with the next epoch or resume") from e

    def fail(self):
        with self.replies:
            self.failed = True
            self.replies.notify_all()

    def close(self):
        """End the process. Threads still waiting on it get an error; the socket's descriptor is
        closed with this object, so none of them can reach a reused descriptor number."""
        self.fail()
        with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)  # the process sees the end of its socket and returns
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class DecodeProcesses:
    """A loader's decode processes, started on first use and kept across epochs."""

    def __init__(self, count: int):
        self.count = count
        self.processes: list[DecodeProcess | None] = [None] * count
        self.lock = threading.Lock()

    def running(self) -> list[DecodeProcess]:
        """All of them, started or replaced where one has died (checked once per epoch)."""
        with self.lock:
            for i, process in enumerate(self.processes):
                if process is None or not process.alive():
                    if process is not None:
                        process.close()
                    self.processes[i] = DecodeProcess()
            return list(self.processes)

    def pids(self) -> list[int]:
        return [p.process.pid for p in self.processes if p is not None]

    def close(self):
        with self.lock:
            for process in self.processes:
                if process is not None:
                    process.close()
            self.processes = [None] * self.count


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# Signals first, before the imports: Ctrl-C reaches the whole process group and SLURM's SIGTERM
# every process of the job step. The trainer handles them (a SIGTERM saves a checkpoint, which
# takes more batches); closing the socket, or the trainer's death, ends the process. The package
# root goes first on the path: `python -c` puts the working directory there, which may hold
# another checkout of pixeldit than the one the loader runs (its messages would not match).
_CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
          "signal.signal(signal.SIGTERM, signal.SIG_IGN); sys.path.insert(0, sys.argv[2]); "
          "from pixeldit.data_pipelines.decode_processes import serve, Connection; serve(Connection(int(sys.argv[1])))")


def serve(conn):
    """A decode process: batches in, failures out, until the loader closes the socket."""
    mappings: dict[int, mmap.mmap] = {}
    while True:
        try:
            inbox, lengths, output, shape, crop, flips, new, drop = conn.recv()
            for segment in new:
                fd = recv_handle(conn)
                mappings[segment] = mmap.mmap(fd, 0)
                os.close(fd)
        except (EOFError, OSError):  # the loader closed or reset the socket: done
            return
        with memoryview(mappings[inbox]) as whole, whole[ARRAY_OFFSET:] as payload:
            ends = list(itertools.accumulate(lengths))
            datas = [payload[end - length:end] for end, length in zip(ends, lengths)]
            out = np.frombuffer(mappings[output], dtype=np.uint8, count=int(np.prod(shape)),
                                offset=ARRAY_OFFSET).reshape(shape)
            failures = images.decode_batch(datas, out, crop, flips)
            for data in datas:
                data.release()
            del out, datas
        for segment in drop:
            mappings.pop(segment).close()
        try:
            conn.send(failures)
        except OSError:  # closed while we decoded: no one waits for this batch
            return
