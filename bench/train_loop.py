"""Training-loop overhead: `pixeldit train` images/s against the bare model step of bench/model_step.py.

    python bench/train_loop.py --dtype both --rounds 2 --steps 4          # the A/B (issue 14, goal 2)
    python bench/train_loop.py --dtype bf16 --profile --steps 3           # where the trainer's extra time goes

The goal: the trainer's img/s for PixelDiT-B at 256², batch 2, on synthetic shards is at least 0.95x
that of the step bench/model_step.py times for the same model, batch and precision; the loader, the
EMA, the logging and the step's host syncs / all-reduce together may cost 5%.

Two arms per dtype, alternating in one run (the next round swaps the order, so load drifts hit both):

- model: the step exactly as bench/model_step.py builds it (its `build_train_step`, which also applies
  the host set-up of pixeldit/host.py), in a worker process built and warmed up once, then `--steps`
  timed steps per round. A worker, not this process: run in the driver (after it wrote the shards)
  its optimizer step measured ~2x slower, which would flatter the trainer.
- train: `python -m pixeldit train` as a subprocess with the B recipe on synthetic shards (REPA off,
  no evaluation / previews / checkpoints on the way, logging every step), a fresh run directory each
  round. Its per-step time is read back from its TensorBoard event file: the wall time between
  consecutive step events (everything the loop does per step: loader wait, step, EMA, monitor) and
  the trainer's own perf/step_time_s (its step without the monitor), after `--warmup` steps. Once
  the last timed step is logged the trainer gets SIGTERM: it stops at the next step boundary and
  saves, so the end-of-run preview (sampling 40 images) is not waited for.

Both arms run with one intra-op thread (OMP_NUM_THREADS=1 in both processes' environment, and
torch.set_num_threads(1) in the model worker). The synthetic shards are written once (by the trainer's own
ensure_synthetic_data) and hard-linked into each run directory, where the trainer finds them.
CPU seconds per step (all threads and child processes: the trainer's loader worker included) are
reported beside wall time: on a shared machine they move much less with load.

--profile runs the trainer's loop in a subprocess for `--warmup + --steps` steps, timing its pieces
by wrapping them (loader wait, inputs and draws, forward, backward, optimizer step, EMA update,
monitor, the rest of train_step: loss bookkeeping and host syncs), with and without the host set-up
bench/model_step.py applies (pixeldit/host.py), beside the same pieces of the bare model step with
and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from model_step import RECIPE  # noqa: E402  (the same B recipe as the model arm)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pixeldit-b")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the trainer's: per run)")
    ap.add_argument("--model-warmup", type=int, default=None,
                    help="untimed steps of the model worker before its first block (default: --warmup); "
                         "its first blocks measured slower than later ones in some runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="time the trainer's pieces instead of the A/B")
    ap.add_argument("--work", type=Path, default=None, help="folder for the run directories (default: a temp one)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    ap.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", default="train", choices=["train", "model"], help=argparse.SUPPRESS)
    ap.add_argument("--host", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args()


def overrides(args, dtype: str, steps: int) -> list[str]:
    """The trainer's settings for this bench: the B recipe's model, size and precision at batch 2 on
    synthetic shards, REPA off, nothing but logging on the way (every step, so each step is timed)."""
    return [f"model.name={args.model}", f"data.image_size={args.resolution}", "data.source=synthetic",
            "data.decoder=pil", "data.num_workers=1", "repa.mode=off",
            f"train.global_batch={args.batch}", f"train.micro_batch={args.batch}", f"train.steps={steps}",
            "distributed.strategy=ddp", f"distributed.precision={dtype}", "eval.every_steps=0",
            "logging.sample_every_steps=0", "logging.every_steps=1", "checkpoint.every_steps=1000000",
            "checkpoint.keep_last=1"]


def cpu_seconds_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}"


# ------------------------------------------------------------------ the two arms

def model_arm(args, dtype: str):
    """bench/model_step.py's step in its own worker process, started like the trainer (1 thread from
    the start, nothing else in the process), so neither arm inherits the other's heap or threads."""
    from model_step import Arm

    settings = argparse.Namespace(model=args.model, resolution=args.resolution, batch=args.batch, threads=1,
                                  warmup=args.warmup if args.model_warmup is None else args.model_warmup)
    return Arm("model", ROOT, settings, dtype)


def model_block(arm, steps: int) -> dict:
    answer = arm.run(steps)
    return {"step_s": answer["times"], "cpu_s_per_step": answer["cpu_s"] / len(answer["times"])}


def tree_cpu_seconds(pid: int) -> float:
    """User + system seconds of a process and its live descendants (the trainer and its loader worker)."""
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return float("nan")


def prepare_data(args, work: Path) -> Path:
    """The trainer's synthetic shards at this size, written once by its own ensure_synthetic_data."""
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import ensure_synthetic_data

    cfg = load_config(ROOT / RECIPE, overrides(args, "fp32", 10))
    return Path(ensure_synthetic_data(cfg, str(work / "shards"), rank=0))


def run_trainer(args, dtype: str, data: Path, run_dir: Path) -> dict:
    """One `pixeldit train` run in a fresh run dir; its per-step times from the TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    last = args.warmup + args.steps
    run_dir.mkdir(parents=True)
    shutil.copytree(data, run_dir / "data", copy_function=os.link)  # ensure_synthetic_data finds them there
    cmd = [sys.executable, "-m", "pixeldit", "train", "--config", RECIPE, "--run-dir", str(run_dir)]
    for o in overrides(args, dtype, last + 5):  # never reached: SIGTERM stops it after `last`
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu_at, tail = {}, []
    for line in proc.stderr:
        tail = (tail + [line])[-30:]
        if " step " in line and "pixeldit.train" in line:
            try:
                step = int(line.split(" step ", 1)[1].split("/", 1)[0])
            except ValueError:
                continue
            cpu_at[step] = tree_cpu_seconds(proc.pid)
            if step == last:
                proc.send_signal(signal.SIGTERM)  # stop at the next step boundary (it saves), no final preview
    if proc.wait() != 0:
        raise SystemExit(f"pixeldit train ended with {proc.returncode}:\n{''.join(tail)}")
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = {e.step: e for e in acc.Scalars("perf/step_time_s")}
    timed = range(args.warmup + 1, last + 1)
    wall = [events[k].wall_time - events[k - 1].wall_time for k in timed]
    own = [events[k].value for k in timed]
    wait = {e.step: e.value for e in acc.Scalars("perf/data_wait_share")}
    shutil.rmtree(run_dir, ignore_errors=True)  # a B checkpoint is ~3 GB
    return {"step_s": wall, "own_step_s": own, "data_wait_share": [wait[k] for k in timed],
            "cpu_s_per_step": (cpu_at[last] - cpu_at[args.warmup]) / args.steps}


# ------------------------------------------------------------------ the A/B

def ab(args, work: Path, cpu: str) -> dict:
    data = prepare_data(args, work)
    rows = {}
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        model = model_arm(args, dtype)
        arms = {"model": [], "train": []}
        ratios, cpu_ratios = [], []
        for r in range(args.rounds):
            order = ("model", "train") if r % 2 == 0 else ("train", "model")
            block = {}
            for name in order:
                block[name] = (model_block(model, args.steps) if name == "model"
                               else run_trainer(args, dtype, data, work / f"run_{dtype}_{r}"))
                arms[name].append(block[name])
            m, t = statistics.median(block["model"]["step_s"]), statistics.median(block["train"]["step_s"])
            ratios.append(m / t)
            cpu_ratios.append(block["model"]["cpu_s_per_step"] / block["train"]["cpu_s_per_step"])
            print(f"  {dtype} round {r}: model {m:.3f} s/step  train {t:.3f} s/step (own "
                  f"{statistics.median(block['train']['own_step_s']):.3f})  train/model img/s {m / t:.3f}  "
                  f"cpu/step model {block['model']['cpu_s_per_step']:.3f} train "
                  f"{block['train']['cpu_s_per_step']:.3f}", flush=True)
        model.close()
        rows[dtype] = {"model": arms["model"], "train": arms["train"], "ratio_per_round": ratios,
                       "cpu_ratio_per_round": cpu_ratios}
    print(f"\n{args.model} {args.resolution}x{args.resolution} batch {args.batch}, 1 thread, {cpu}; "
          f"{args.rounds} rounds x {args.steps} steps per arm (trainer: after {args.warmup} warm-up steps), "
          "alternating; ratios: model s/step over train s/step per round (wall, and CPU seconds)")
    print(f"{'dtype':<6}{'model img/s':>12}{'model s/step':>14}{'spread':>13}{'train img/s':>12}{'train s/step':>14}"
          f"{'spread':>13}{'train/model':>12}{'spread':>13}{'cpu s/step model':>18}{'train':>7}{'cpu ratio':>11}"
          f"{'spread':>13}")
    summary = {}
    for dtype, row in rows.items():
        m = [s for b in row["model"] for s in b["step_s"]]
        t = [s for b in row["train"] for s in b["step_s"]]
        q, qc = row["ratio_per_round"], row["cpu_ratio_per_round"]
        cm = statistics.median(b["cpu_s_per_step"] for b in row["model"])
        ct = statistics.median(b["cpu_s_per_step"] for b in row["train"])
        print(f"{dtype:<6}{args.batch / statistics.median(m):>12.3f}{statistics.median(m):>14.3f}{spread(m):>13}"
              f"{args.batch / statistics.median(t):>12.3f}{statistics.median(t):>14.3f}{spread(t):>13}"
              f"{statistics.median(q):>12.3f}{spread(q):>13}{cm:>18.3f}{ct:>7.3f}"
              f"{statistics.median(qc):>11.3f}{spread(qc):>13}")
        summary[dtype] = {"model_images_per_s": args.batch / statistics.median(m),
                          "train_images_per_s": args.batch / statistics.median(t),
                          "train_over_model": statistics.median(q), "cpu_s_per_step_model": cm,
                          "train_over_model_cpu": statistics.median(qc),
                          "cpu_s_per_step_train": ct}
    return {"rows": rows, "summary": summary}


# ------------------------------------------------------------------ the profile

class Pieces:
    """Seconds per named piece, per step: wrap(obj, name) times every call of obj.name."""

    def __init__(self):
        self.now: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def add(self, key: str, seconds: float):
        self.now[key] = self.now.get(key, 0.0) + seconds

    def wrap(self, obj, name: str, key: str | None = None):
        inner = getattr(obj, name)

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.add(key or name, time.perf_counter() - start)

        setattr(obj, name, timed)

    def end_step(self, **extra):
        self.steps.append({**self.now, **extra})
        self.now = {}


def strategy_pieces(pieces: Pieces, strategy):
    for name in ("begin_step", "forward", "backward", "finish_step"):
        pieces.wrap(strategy, name)


def profile_worker(args) -> None:
    """The trainer's loop (as Trainer.fit runs it, without the end-of-run save and preview), its
    pieces timed; one JSON line of per-step pieces after the warm-up."""
    import torch

    import pixeldit.data_pipelines.loader as loader_module
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    torch.set_num_threads(1)
    if args.host:
        from pixeldit.host import prepare_host
        prepare_host(torch.device("cpu"))
    cfg = load_config(ROOT / RECIPE, overrides(args, args.dtype, 1000))
    trainer = Trainer(cfg, str(args.run_dir))
    pieces = Pieces()
    strategy_pieces(pieces, trainer.strategy)
    pieces.wrap(trainer.ema, "update", "ema_update")  # on a CPU: handing the update to its thread
    pieces.wrap(trainer.ema, "settle", "ema_wait")  # what the step still waits for it, before the last backward
    pieces.wrap(trainer.monitor, "step", "monitor")
    pieces.wrap(trainer.flow, "draw", "draws")
    pieces.wrap(trainer.flow, "training_inputs", "inputs")
    pieces.wrap(loader_module, "to_model_input", "inputs")
    trainer.monitor.start(0, trainer.banner(False))
    batches = trainer._batches()
    try:
        for _ in range(args.warmup + args.steps):
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu0 = cpu_seconds_self()
            start = time.perf_counter()
            batch, _ = next(batches)
            t_data = time.perf_counter() - start
            t0 = time.perf_counter()
            metrics = trainer.train_step(batch)
            t_step = time.perf_counter() - t0
            metrics["data_time"], metrics["step_time"] = t_data, time.perf_counter() - start
            t0 = time.perf_counter()
            trainer._after_step(metrics)
            t_after = time.perf_counter() - t0
            pieces.end_step(loader_wait=t_data, train_step=t_step, after_step=t_after,
                            total=time.perf_counter() - start, cpu=cpu_seconds_self() - cpu0,
                            minor_faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    finally:
        trainer.monitor.close()
        batches.close()
        trainer.loader.close()
    print(json.dumps(pieces.steps[args.warmup:]), flush=True)


def model_pieces(args) -> list[dict]:
    """The same pieces of bench/model_step.py's step (its strategy, reached through the step's closure)."""
    import torch

    from model_step import build_train_step

    torch.set_num_threads(1)
    if not args.host:  # the step without pixeldit/host.py's malloc settings, as the trainer runs today
        import pixeldit.host
        pixeldit.host.prepare_host = lambda device: None
    step, _ = build_train_step(ROOT, args.model, args.resolution, args.batch, args.dtype)
    strategy = next(c.cell_contents for c in step.__closure__ if hasattr(c.cell_contents, "finish_step"))
    pieces = Pieces()
    strategy_pieces(pieces, strategy)
    for i in range(args.warmup + args.steps):
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu0 = cpu_seconds_self()
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
        pieces.end_step(total=total, cpu=cpu_seconds_self() - cpu0,
                        minor_faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    return pieces.steps[args.warmup:]


PIECES = ["loader_wait", "inputs", "draws", "begin_step", "forward", "backward", "finish_step", "ema_update", "ema_wait",
          "train_step_rest", "monitor", "after_step_rest", "total", "cpu", "minor_faults"]


def medians(steps: list[dict]) -> dict:
    out = {}
    for s in steps:
        if "train_step" in s:
            inside = sum(s.get(k, 0.0) for k in ("inputs", "draws", "begin_step", "forward", "backward",
                                                  "finish_step", "ema_update", "ema_wait"))
            s["train_step_rest"] = s["train_step"] - inside
            s["after_step_rest"] = s["after_step"] - s.get("monitor", 0.0)
    for key in PIECES:
        values = [s[key] for s in steps if key in s]
        if values:
            out[key] = statistics.median(values)
    return out


def profile(args, work: Path, cpu: str) -> dict:
    """Per dtype: the model step's pieces (this process, host set-up applied as model_step does), then the
    trainer's loop in a subprocess as `pixeldit train` runs it, and again with the host set-up."""
    data = prepare_data(args, work)
    results = {}
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        arms = {}
        # each arm in its own process; "host set-up": pixeldit/host.py's prepare_host, which
        # build_train_step applies and the trainer (today) does not
        for name, arm, host in (("model step", "model", True), ("train (as pixeldit train)", "train", False),
                                ("model, no host set-up", "model", False), ("train, host set-up", "train", True)):
            run_dir = work / f"profile_{dtype}_{len(arms)}"
            run_dir.mkdir(parents=True)
            shutil.copytree(data, run_dir / "data", copy_function=os.link)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-worker", "--arm", arm, "--dtype", dtype,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--run-dir", str(run_dir),
                   "--model", args.model, "--resolution", str(args.resolution), "--batch", str(args.batch)]
            if host:
                cmd.append("--host")
            out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
            arms[name] = json.loads(out.strip().splitlines()[-1])
            shutil.rmtree(run_dir, ignore_errors=True)
        results[dtype] = {name: {"steps": steps, "median": medians(steps)} for name, steps in arms.items()}
        print(f"\n{dtype}: median seconds per step over {args.steps} steps after {args.warmup}, 1 thread, {cpu}")
        names = list(results[dtype])
        print(f"{'piece':<18}" + "".join(f"{n:>27} " for n in names))
        for key in PIECES:
            cells = [results[dtype][n]["median"].get(key) for n in names]
            fmt = (lambda v: f"{v:>28.0f}") if key == "minor_faults" else (lambda v: f"{v:>28.4f}")
            print(f"{key:<18}" + "".join(fmt(v) if v is not None else f"{'-':>28}" for v in cells), flush=True)
    return results


def main() -> None:
    args = parse_args()
    if args.profile_worker:
        if args.arm == "model":
            return print(json.dumps(model_pieces(args)), flush=True)
        return profile_worker(args)
    from ab import cpu_model

    cpu = cpu_model()
    work = args.work or Path(tempfile.mkdtemp(prefix="pixeldit-train-loop-"))
    try:
        result = profile(args, work, cpu) if args.profile else ab(args, work, cpu)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu,
                                               **result}, indent=1))


if __name__ == "__main__":
    main()
