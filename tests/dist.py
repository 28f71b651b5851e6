"""Run a function on N real processes joined in a gloo process group, with a hard timeout.

A collective entered by one rank alone hangs forever; the timeout turns that
into a test failure that names the ranks still running.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, results, out_dir):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # through a file: tensors sent over a queue travel as shared-memory handles that die
        # with the sending process
        path = os.path.join(out_dir, f"result_{rank}.pt")
        torch.save(fn(rank, world, *args), path)
        results.put((rank, "ok", path))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int = 2, *args, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) on `world` processes; returns the results in rank order."""
    import queue
    import tempfile

    import torch

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    out_dir = tempfile.mkdtemp(prefix="dist_results_")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, results, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status == "ok":
                out[rank] = torch.load(value, weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
    except queue.Empty:
        missing = sorted(set(range(world)) - set(out))
        errors.append(f"timed out after {timeout}s waiting for ranks {missing}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world)]
