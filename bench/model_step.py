"""Train-step time of a PixelDiT model, as `pixeldit train` runs it: forward + backward + clip + AdamW.

    python bench/model_step.py --model pixeldit-b --resolution 256 --batch 2 --dtype both
    python bench/model_step.py --ab 2a2ae1a --batch 2 --rounds 5      # this tree against an older one

The step is built by the tree's own training code (its config defaults, its strategy object, its
optimizer settings, its host set-up), not by this script, so what is timed is what a user of
that tree gets. One process per (tree, dtype) builds the step once; the driver tells it to run
`--steps` steps at a time.

Alone, it reports per dtype the median step time, images/s, achieved GFLOP/s (analytic training
FLOPs, matmuls only, over measured time) and the ratio to a matmul peak measured in the same run
(an MFU against what this machine can do, not against a datasheet number).

With `--ab REV` it checks REV out as a git worktree and alternates: each round runs a block of
steps in the old tree's process, then in the new tree's (the next round swaps the order), so load
drifts hit both arms alike. It reports each arm's median and spread over all timed steps and the
median of the per-round ratios new/old with their spread. bf16 means autocast with fp32 master
weights (ddp) as `pixeldit train` uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pixeldit-b")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per block")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="blocks per arm (alternating with --ab)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads in every arm (the same for both, so the trees are compared, "
                         "not their thread defaults)")
    ap.add_argument("--ab", metavar="REV", default=None, help="also time the step of this older revision")
    ap.add_argument("--new", metavar="TREE", type=Path, default=ROOT,
                    help="the new arm's tree (default: this checkout), e.g. another worktree")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul for the peak")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="profile one step per dtype (this tree) and print the top ROWS ops")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


# ------------------------------------------------------------------ the worker (one tree, one dtype)

RECIPE = "configs/imagenet256/pixeldit_b.yaml"  # the B recipe: ddp, bf16 with fp32 masters


def build_train_step(tree: Path, model: str, resolution: int, batch: int, dtype: str):
    """(step function, arch) through the training code of whichever tree `pixeldit` comes from,
    from its own B recipe with the model, size, batch and precision set and REPA off."""
    import torch
    import torch.nn.functional as F

    import pixeldit
    from pixeldit.models import build_model
    from pixeldit.platform.config import load_config

    if not Path(pixeldit.__file__).is_relative_to(tree):
        raise SystemExit(f"pixeldit comes from {pixeldit.__file__}, not from {tree}: put the tree first on PYTHONPATH")
    cfg = load_config(tree / RECIPE, [f"model.name={model}", f"data.image_size={resolution}", "repa.mode=off",
                             f"train.global_batch={batch}", f"train.micro_batch={batch}",
                             "distributed.strategy=ddp", f"distributed.precision={dtype}"])
    device = torch.device("cpu")
    # modules are looked up by file: the editable install's import hook would hand a tree that lacks
    # one the module of the checkout it was installed from
    if (tree / "pixeldit" / "host.py").exists():  # the host set-up `pixeldit train` applies
        from pixeldit.host import prepare_host
        prepare_host(device)
    torch.manual_seed(0)
    net = build_model(cfg.model.name, **cfg.model.overrides())
    strategy = _build_strategy(tree, net, cfg, device)
    arch = net.arch
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    t = torch.rand(batch)
    y = torch.randint(0, arch.num_classes, (batch,))
    target = torch.randn_like(x)
    stage = cfg.schedule.stages[0]

    def step():
        strategy.begin_step(stage.lr, stage.clip)
        with strategy.accumulating(last=True):
            v, _ = strategy.forward(x, t, y)
            strategy.backward(F.mse_loss(v.float(), target))
        strategy.finish_step(skip=False)

    return step, arch


def _build_strategy(tree: Path, net, cfg, device):
    if not (tree / "pixeldit" / "parallel").is_dir():  # trees before pixeldit.parallel took the whole Config
        from pixeldit.platform.strategies import TrainModule, build_strategy
        return build_strategy(TrainModule(net, None, None), cfg, device)
    from pixeldit.parallel import TrainModule, build_strategy
    return build_strategy(TrainModule(net, None, None), cfg.parallel_spec(world=1), device)


def worker(args) -> None:
    """Build once, then for each line `N` on stdin run N steps and answer, as JSON, their seconds
    and the process's CPU seconds over them (less sensitive than wall time to other jobs' load)."""
    import resource

    import torch

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    torch.set_num_threads(args.threads)
    step, _ = build_train_step(Path.cwd(), args.model, args.resolution, args.batch, args.dtype)
    for _ in range(args.warmup):
        step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        times, cpu0 = [], cpu_seconds()
        for _ in range(int(line)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times, "cpu_s": cpu_seconds() - cpu0}), flush=True)


class Arm:
    """A worker process of one tree for one dtype."""

    def __init__(self, name: str, tree: Path, args, dtype: str):
        self.name, self.times = name, []
        cmd = [sys.executable, str(ROOT / "bench" / "model_step.py"), "--worker", "--model", args.model,
               "--resolution", str(args.resolution), "--batch", str(args.batch), "--dtype", dtype,
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer()  # built and warmed up

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker ended without answering (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        """{"times": seconds of each step, "cpu_s": the worker's CPU seconds over them}."""
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        answer = self._answer()
        self.times += answer["times"]
        return answer

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------ the driver

def ab_rows(args, old_tree: Path) -> list[dict]:
    rows = []
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        # one dtype at a time: two B models with AdamW state are ~6 GB, four would crowd a small machine
        arms = {"old": Arm("old", old_tree, args, dtype), "new": Arm("new", args.new, args, dtype)}
        ratios = []
        try:
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                block = {name: statistics.median(arms[name].run(args.steps)["times"]) for name in order}
                ratios.append(block["new"] / block["old"])
                print(f"  {dtype} round {r}: old {block['old']:.3f} s  new {block['new']:.3f} s  "
                      f"new/old {ratios[-1]:.3f}", flush=True)
        finally:
            for arm in arms.values():
                arm.close()
        rows.append({"dtype": dtype, "old_step_s": arms["old"].times, "new_step_s": arms["new"].times,
                     "ratio_per_round": ratios})
    return rows


def print_ab(args, rows: list[dict], cpu: str) -> None:
    print(f"\n{args.model} {args.resolution}x{args.resolution} batch {args.batch}, {args.threads} thread(s), "
          f"{cpu}; {args.rounds} rounds x {args.steps} steps per arm, alternating; old = {args.ab}")
    print(f"{'dtype':<6}{'old median s':>13}{'old spread':>16}{'new median s':>13}{'new spread':>16}"
          f"{'new/old':>9}{'ratio spread':>16}")
    for r in rows:
        o, n, q = r["old_step_s"], r["new_step_s"], r["ratio_per_round"]
        print(f"{r['dtype']:<6}{statistics.median(o):>13.3f}{min(o):>8.3f}-{max(o):<7.3f}"
              f"{statistics.median(n):>13.3f}{min(n):>8.3f}-{max(n):<7.3f}"
              f"{statistics.median(q):>9.3f}{min(q):>8.3f}-{max(q):<7.3f}")


def single_tree(args) -> list[dict]:
    import torch

    from _common import DTYPES, matmul_peak
    from pixeldit.models import training_flops

    torch.set_num_threads(args.threads)
    results = []
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        step, arch = build_train_step(ROOT, args.model, args.resolution, args.batch, dtype)
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps * args.rounds):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            print(f"  {dtype} step: {times[-1]:.3f} s", flush=True)
        step_s = statistics.median(times)
        flops = training_flops(arch, args.resolution, args.resolution) * args.batch
        peak = matmul_peak(torch.device("cpu"), DTYPES[dtype], n=args.peak_n)
        results.append({"dtype": dtype, "step_s": step_s, "step_s_all": times, "images_per_s": args.batch / step_s,
                        "achieved_gflops": flops / step_s / 1e9, "peak_gflops": peak,
                        "mfu_vs_peak": flops / step_s / 1e9 / peak})
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    print(f"\n{args.model} {args.resolution}x{args.resolution} batch {args.batch}, {args.threads} thread(s)")
    print(f"{'dtype':<6}{'step s':>9}{'img/s':>9}{'GFLOP/s':>10}{'peak GFLOP/s':>14}{'MFU vs peak':>13}")
    for r in results:
        print(f"{r['dtype']:<6}{r['step_s']:>9.3f}{r['images_per_s']:>9.2f}{r['achieved_gflops']:>10.1f}"
              f"{r['peak_gflops']:>14.1f}{r['mfu_vs_peak']:>12.1%}")
    return results


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT / "bench"))
    from ab import cpu_model

    summary = {}
    if args.ab:
        with tempfile.TemporaryDirectory(prefix="pixeldit-step-ab-") as tmp:
            old = Path(tmp) / "old"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.ab], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                rows = ab_rows(args, old)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
        print_ab(args, rows, cpu_model())
        summary = {r["dtype"]: {"new_over_old": statistics.median(r["ratio_per_round"])} for r in rows}
        results = rows
    else:
        sys.path.insert(0, str(ROOT))
        results = single_tree(args)
        summary = {r["dtype"]: {"step_s": r["step_s"]} for r in results}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_model(), "results": results,
                                               "summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
