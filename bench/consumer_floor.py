"""How far a cheaper reader could take the pil loader: ours / bound with the reading done before the epoch.

    python bench/consumer_floor.py --images 800 --passes 2 --rounds 20

An experiment, not a pipeline. Issue 14's goal 3 asks for the loader at >= 0.90 of a bare decode
(bench/data_throughput.py's bound) on pre-cropped 256² shards. The loader's consumer process
reads the samples out of their shards, admits them, copies their bytes to a decode process and
builds the batch. This script asks what the ratio would be if reading and admitting cost nothing.
It alternates three arms, round by round, on the crop256 set:

* current: `ShardLoader(pil, W decode processes)` as `pixeldit train` runs it;
* floor: the same loader, threads and decode processes, but every batch's samples are read and
  admitted before the epoch starts (untimed, and outside the CPU counts); the timed epoch runs
  the rest of the loader's own collate: it claims batches, copies their bytes to the processes,
  waits for the pixels and builds the batches. No reader can cost less than nothing, so this is the ceiling of any cheaper reader;
* bound: the data_throughput bound, simplejpeg on W processes (the better of its two variants by
  median img/s, as that bench takes it).

Prints each arm's median img/s, ratio to the bound (per round, then the median, with quartiles),
CPU ms an image in the decode processes and in the consumer, and the paired floor / current ratio.
The floor arm patches two names in the loader module (LaneTurns.read and admit) for its epochs.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

import data_throughput as dt
from _common import machine, write_json
from pixeldit.data_pipelines import loader as loader_module
from pixeldit.data_pipelines.lanes import rank_groups
from pixeldit.data_pipelines.samples import admit
from pixeldit.host import exempt_setup_from_collection

SET = "crop256"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=800, help="photos in the shard set (4 classes)")
    ap.add_argument("--passes", type=int, default=2, help="an epoch reads the set this many times")
    ap.add_argument("--workers", type=int, default=2, help="decode processes = lanes = bound processes")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (after one warm-up)")
    ap.add_argument("--workdir", default=None, help="keep the shard sets here (reused if present)")
    ap.add_argument("--json", default=None, metavar="PATH")
    return ap.parse_args()


def read_ahead(spec, epoch: int) -> tuple[dict, dict]:
    """The epoch's groups by batch number, and each group's admitted samples, read and admitted now."""
    groups, admitted = {}, {}
    for k, (group, stats) in enumerate(rank_groups(spec, epoch, 0)):
        groups[k] = group, stats
        admitted[id(group)] = admit(spec, epoch, group, stats)
    return groups, admitted


def consumer_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loader_epoch(loader, floor: bool) -> dict:
    """One epoch of `loader`, with the reading done ahead when `floor`."""
    original = loader_module.LaneTurns.read, loader_module.admit
    if floor:  # the loader's own collate still runs: buffer, decode, failures, batch
        groups, admitted = read_ahead(loader.spec, loader.epoch)
        loader_module.LaneTurns.read = lambda turns, k: groups[k]
        loader_module.admit = lambda spec, epoch, group, stats: admitted[id(group)]
    try:
        loader.processes.running()  # started (or replaced) before the clocks start
        before = dt.process_cpu(loader.processes.pids())
        cpu, wall = consumer_cpu(), time.perf_counter()
        images = sum(len(batch["key"]) for batch in loader)
        wall, cpu = time.perf_counter() - wall, consumer_cpu() - cpu
        procs = dt.process_cpu(loader.processes.pids()) - before
    finally:
        loader_module.LaneTurns.read, loader_module.admit = original
    return {"img_s": images / wall, "procs_ms": 1e3 * procs / images, "consumer_ms": 1e3 * cpu / images}


def bound_epoch(run) -> dict:
    wall = time.perf_counter()
    (images, cpu), = run()
    wall = time.perf_counter() - wall
    return {"img_s": images / wall, "procs_ms": 1e3 * cpu / images, "consumer_ms": 0.0}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0],) * 3
    return q1, statistics.median(xs), q3


def main():
    args = parse_args()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="pixeldit-bench-")
    root = dt.build_datasets(Path(args.workdir or tmp.name), args.images, args.workers)[SET]
    dt._BYTES[SET] = dt.read_jpegs(root)
    pool = mp.get_context("fork").Pool(args.workers, torch.set_num_threads, (1,))
    settings = argparse.Namespace(batch=32, window=512, passes=args.passes)  # what data_throughput's helpers read
    loader = loader_module.ShardLoader(dt.spec_for(root, args.workers, settings, args.passes), "pil", args.workers)
    bounds = {"fresh": dt.bound(pool, args.workers, dt._decode_simplejpeg, SET, 0, settings),
              "reused": dt.bound(pool, args.workers, functools.partial(dt._decode_simplejpeg, reuse=True), SET, 0,
                                 settings)}
    runs = {arm: [] for arm in ("current", "floor", *bounds)}
    with exempt_setup_from_collection():
        for r in range(args.rounds + 1):  # round 0 warms the page cache, the processes and the pool
            arms = ("current", "floor") if r % 2 else ("floor", "current")  # neither always goes first
            results = {arm: loader_epoch(loader, arm == "floor") for arm in arms}
            results.update({name: bound_epoch(run) for name, run in bounds.items()})
            if r:
                for arm, result in results.items():
                    runs[arm].append(result)
            print(f"round {r}/{args.rounds} done", flush=True)
    pool.close()
    bound = max(bounds, key=lambda name: statistics.median(x["img_s"] for x in runs[name]))
    print(f"\n{SET}, {args.images} photos x {args.passes} passes, {args.workers} decode processes; "
          f"the bound is simplejpeg {bound} (2 variants, best median img/s)")
    print(f"{'arm':<8} {'img/s':>6}  {'ours / bound: q25 median q75':>30}  {'CPU ms/img: decode procs':>24}  consumer")
    summary = {}
    for arm in ("current", "floor", bound):
        ratios = [x["img_s"] / b["img_s"] for x, b in zip(runs[arm], runs[bound])]
        q1, mid, q3 = quartiles(ratios)
        summary[arm] = {"img_s": statistics.median(x["img_s"] for x in runs[arm]), "ratio": mid,
                        "ratio_q25": q1, "ratio_q75": q3,
                        "procs_ms": statistics.median(x["procs_ms"] for x in runs[arm]),
                        "consumer_ms": statistics.median(x["consumer_ms"] for x in runs[arm])}
        s = summary[arm]
        print(f"{arm:<8} {s['img_s']:6.0f}  {q1:10.3f} {mid:8.3f} {q3:8.3f}  {s['procs_ms']:24.3f}  "
              f"{s['consumer_ms']:.3f}")
    paired = [f["img_s"] / c["img_s"] for f, c in zip(runs["floor"], runs["current"])]
    q1, mid, q3 = quartiles(paired)
    print(f"floor / current img/s, paired by round: median {mid:.3f} (q25 {q1:.3f}, q75 {q3:.3f}), "
          f"floor ahead in {sum(p > 1 for p in paired)} of {len(paired)}")
    if args.json:
        write_json(args.json, {"args": vars(args), "machine": machine(torch.device("cpu")), "bound": bound,
                               "summary": summary, "floor_over_current": paired, "runs": runs})
    loader.close()
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
