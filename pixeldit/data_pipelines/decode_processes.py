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
import weakref
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Sequence

import numpy as np

from ..descriptors import Descriptor
from . import images


class Segment(Descriptor):
    """A shared buffer's file descriptor, open for as long as anyone holds this object."""

    def __init__(self, fd: int, one_off: bool):
        super().__init__(fd)
        self.one_off = one_off  # not kept by the pool: processes drop their mapping after decoding into it


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
    return array, Segment(fd, one_off)


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
        """Copy `datas` in one after another; where each starts in the inbox's mapping."""
        needed = sum(map(len, datas))
        if self.array is None or self.array.size < needed:
            if self.segment is not None:
                self.stale.append(self.segment)
            self.array, self.segment = shared_array((max(2 * needed, 1 << 22),))
        # memoryview slice assignment: the copy without a numpy array made and indexed per image
        # (a third less CPU per image, measured; `datas` are bytes or byte views, format "B")
        target, end, starts = memoryview(self.array), 0, []
        for data in datas:
            starts.append(ARRAY_OFFSET + end)
            target[end:end + len(data)] = data
            end += len(data)
        return starts


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
        self.mapped: set[int] = set()  # descriptors this process has a mapping of
        self.gone: deque[int] = deque()  # shards sent to it that the loader has let go of since
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
               flips: Sequence[bool], places: Sequence[tuple[Descriptor, int] | None] | None = None) -> dict[int, str]:
        """`images.decode_batch` in the process, into `output` seen as an array of `shape`.

        An image with a place (the descriptor of a local shard and its offset there) is decoded
        where it lies: the process maps the shard itself, the first time it meets it, and drops
        the mapping once the loader lets go of the shard. The others are copied into `inbox`.
        Several threads may call this at once (each with its own inbox): the process works through
        their batches in the order they were sent, and the next one is already waiting in its
        socket when it finishes one, so it does not idle while a thread builds the batch it just
        decoded and reads the next.
        """
        places = places or [None] * len(datas)
        inline = [data for data, at in zip(datas, places) if at is None]
        starts = iter(inbox.fill(inline) if inline else ())
        spans, held = [], {output.id: output}  # spans: (mapping, offset, length) of each image
        for data, at in zip(datas, places):
            where, offset = (inbox.segment, next(starts)) if at is None else at
            held[where.id] = where
            spans.append((where.id, offset, len(data)))
        try:
            ticket = self._send(inbox, spans, held, output, shape, crop, flips)
            inbox.stale.clear()
            return self._reply(ticket)
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

    def _send(self, inbox: Inbox, spans: list, held: dict[int, Descriptor], output: Segment,
              shape: tuple[int, ...], crop: bool, flips: Sequence[bool]) -> int:
        """The batch's message, then every descriptor the process has no mapping of yet; the
        batch's place in the order replies come back in."""
        with self.send_lock:
            if self.failed:
                raise EOFError("an earlier exchange with the process failed")
            ticket, self.sent = self.sent, self.sent + 1
            new = [d for d in held.values() if d.id not in self.mapped]
            gone = [self.gone.popleft() for _ in range(len(self.gone))]
            drop = [s.id for s in inbox.stale if s.id in self.mapped] + ([output.id] if output.one_off else [])
            drop += [i for i in gone if i in self.mapped]
            self.conn.send((spans, output.id, shape, crop, list(flips), [(d.id, d is output) for d in new], drop))
            for descriptor in new:
                send_handle(self.conn, descriptor.fd, self.process.pid)
                self.mapped.add(descriptor.id)
                if not isinstance(descriptor, Segment):  # a shard: its mapping goes when the loader lets go
                    weakref.finalize(descriptor, self.gone.append, descriptor.id)
            self.mapped.difference_update(drop)
            return ticket

    def _reply(self, ticket: int) -> dict[int, str]:
        with self.replies:
            self.replies.wait_for(lambda: self.received == ticket or self.failed)
            if self.failed:
                raise EOFError("an earlier exchange with the process failed")
            try:
                return self.conn.recv()
            finally:
                self.received += 1
                self.replies.notify_all()

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
            spans, output, shape, crop, flips, new, drop = conn.recv()
            for descriptor, writable in new:
                fd = recv_handle(conn)
                mappings[descriptor] = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
                os.close(fd)
        except (EOFError, OSError):  # the loader closed or reset the socket: done
            return
        whole = {where: memoryview(mappings[where]) for where in {where for where, _, _ in spans}}
        datas = [whole[where][offset:offset + length] for where, offset, length in spans]
        out = np.frombuffer(mappings[output], dtype=np.uint8, count=int(np.prod(shape)),
                            offset=ARRAY_OFFSET).reshape(shape)
        failures = images.decode_batch(datas, out, crop, flips)
        for view in itertools.chain(datas, whole.values()):
            view.release()
        del out, datas, whole
        for descriptor in drop:
            mappings.pop(descriptor).close()
        try:
            conn.send(failures)
        except OSError:  # closed while we decoded: no one waits for this batch
            return
