"""Train-step throughput of ddp / fsdp / zero2 / zero3 on 2 CPU processes, and per-rank state bytes.

    python bench/strategies.py --steps 8 --model pixeldit-small --size 32

Prints img/s per strategy as a ratio to one process (ddp, world 1) measured in the
same run, and the per-rank bytes of sharded training state (fp32 master + two
AdamW moments + EMA, counted from the rank's master fragments) against an
unsharded copy. On one shared-memory CPU host the ratios show communication and
framework overhead, not multi-GPU scaling.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.dist import free_port  # noqa: E402


def _worker(rank, world, port, args, strategy, data, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    import torch
    torch.set_num_threads(max(1, args.threads // world))
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    cfg = load_config(None, [f"data.source={data}", f"data.image_size={args.size}", f"model.name={args.model}",
                             f"distributed.strategy={strategy}", f"train.global_batch={args.batch}",
                             f"train.micro_batch={args.batch // world}", "logging.tensorboard=false",
                             f"train.steps={args.steps}", "checkpoint.every_steps=1000000"])
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix=f"bench_{strategy}_"))
    batches = iter(trainer.loader)
    times = []
    for _ in range(args.warmup + args.steps):
        batch = next(batches)
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
    fragments = sum(f.master.numel() for f in trainer.strategy.checkpoint.fragments())
    total = sum(p.numel() for p in trainer.strategy.module.parameters()) if strategy == "ddp" else None
    out.put((rank, {"step_s": sorted(times[args.warmup:])[len(times[args.warmup:]) // 2],
                    "state_bytes": 4 * 4 * fragments, "params": total}))


def run(strategy, world, args, data):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, strategy, data, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=900) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pixeldit-small")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--strategies", default="ddp,fsdp,zero2,zero3")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))

    from pixeldit.data_pipelines.writer import synthetic_items, write_shards
    data = tempfile.mkdtemp(prefix="bench_data_")
    items, classes = synthetic_items(10, 40, args.size, 0)
    write_shards(items, classes, data, shard_samples=100, progress=False)

    base = run("ddp", 1, args, data)[0]
    base_ips = args.batch / base["step_s"]
    rows = [("1 process (ddp)", base_ips, 1.0, base["state_bytes"], 1.0)]
    for strategy in args.strategies.split(","):
        r = run(strategy, 2, args, data)
        step_s = max(v["step_s"] for v in r.values())
        ips = args.batch / step_s
        state = max(v["state_bytes"] for v in r.values())
        rows.append((f"2 processes {strategy}", ips, ips / base_ips, state, state / base["state_bytes"]))

    print(f"\n{args.model} {args.size}x{args.size}, global batch {args.batch}, fp32, {args.steps} timed steps")
    print(f"{'run':24s} {'img/s':>8s} {'vs 1 proc':>10s} {'state/rank':>12s} {'vs unsharded':>13s}")
    for name, ips, ratio, state, state_ratio in rows:
        print(f"{name:24s} {ips:8.1f} {ratio:9.2f}x {state / 2**20:10.1f}MB {state_ratio:12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("run", "img_s", "ratio", "state_bytes", "state_ratio"), r)) for r in rows], f,
                      indent=1)


if __name__ == "__main__":
    main()
