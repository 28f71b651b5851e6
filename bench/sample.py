"""Sampling throughput: images/s and image-evaluations per image for each sampler.

    python bench/sample.py                                   # pixeldit-tiny 32 px and pixeldit-b 256 px
    python bench/sample.py --runs pixeldit-xl@256:32:100 --device cuda --dtype bf16

A run is MODEL@RESOLUTION:BATCH:STEPS. Each (run, sampler) times whole `sample()`
calls (noise, integration, CFG) after a one-step warm-up, with the paper's
320-epoch guidance by default (w 2.75 on (0.1, 0.9)). Runs with fewer than 100
steps are also projected to 100 steps from the measured seconds per
image-evaluation, marked "extrapolated": a guided step pushes a 2B batch, so
the projection assumes cost linear in images pushed, which large batches on a
GPU approach and small CPU batches roughly follow. Weights are the presets'
initialisation: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from _common import machine, median, timed, write_json
from pixeldit.diffusion import SAMPLERS, sample
from pixeldit.evaluation.sampling import evaluations_per_image
from pixeldit.models import PRESETS, build_model

PAPER_STEPS = 100


def parse_run(text: str) -> dict:
    try:
        model, rest = text.split("@")
        resolution, batch, steps = (int(v) for v in rest.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL@RESOLUTION:BATCH:STEPS") from None
    if model not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown model {model!r}; known: {', '.join(sorted(PRESETS))}")
    return {"model": model, "resolution": resolution, "batch": batch, "steps": steps}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=lambda s: [parse_run(r) for r in s.split(",")],
                    default=[parse_run("pixeldit-tiny@32:8:100"), parse_run("pixeldit-b@256:2:4")],
                    help="comma list of MODEL@RESOLUTION:BATCH:STEPS")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--cfg-scale", type=float, default=2.75)
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=[0.1, 0.9])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, as --bf16 samples")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per (run, sampler); the median is kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    return ap.parse_args()


def bench_sampler(velocity_model, num_classes: int, run: dict, sampler: str, args, device) -> dict:
    B, R = run["batch"], run["resolution"]
    labels = torch.arange(B) % num_classes
    cfg = {"cfg_scale": args.cfg_scale, "cfg_interval": tuple(args.cfg_interval)}
    last = {}

    def call(steps):
        last["result"] = sample(velocity_model, labels, range(B), (3, R, R), null_class=num_classes, seed=0,
                                sampler=sampler, steps=steps, device=device, **cfg)

    call(1)  # oneDNN / cuBLAS setup and the position tables, outside the timing
    seconds = median(timed(lambda: call(run["steps"]), device, steps=args.repeats, warmup=0,
                           log=lambda kind, i, s: print(f"  {run['model']} {sampler} {kind} {i}: {s:.2f} s",
                                                        flush=True)))
    evaluations = last["result"].image_evaluations // B
    assert evaluations == evaluations_per_image(sampler, run["steps"], 1.0, args.cfg_scale, args.cfg_interval)
    per_eval = seconds / (B * evaluations)
    evals_100 = evaluations_per_image(sampler, PAPER_STEPS, 1.0, args.cfg_scale, args.cfg_interval)
    return {**run, "sampler": sampler, "seconds": seconds, "images_per_s": B / seconds,
            "evaluations_per_image": evaluations, "s_per_image_evaluation": per_eval,
            "evaluations_per_image_100": evals_100, "images_per_s_100": 1 / (per_eval * evals_100),
            "extrapolated": run["steps"] != PAPER_STEPS}


def bench_run(run: dict, samplers: list[str], args, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(run["model"]).to(device).eval()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def velocity_model(x, t, y):
        with autocast:
            return model(x, t, y).float()

    return [bench_sampler(velocity_model, model.num_classes, run, s, args, device) for s in samplers]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    samplers = args.samplers.split(",")
    info = machine(device)
    print(f"device {device} | {info.get('gpu', info['cpu'])} | {info['threads']} threads | "
          f"torch {info['torch']} ({info['cpu_capability']}) | load {info['loadavg_1m']} | {args.dtype} | "
          f"cfg {args.cfg_scale:g} on ({args.cfg_interval[0]:g}, {args.cfg_interval[1]:g})")
    results = [r for run in args.runs for r in bench_run(run, samplers, args, device)]

    print(f"\n{'model':<15}{'res':>5}{'batch':>6}{'steps':>6}  {'sampler':<8}{'evals/img':>10}{'s/call':>9}"
          f"{'img/s':>9}{'ms/eval':>9}  {'at 100 steps: evals/img':>24}{'img/s':>10}{'s/img':>9}")
    for r in results:
        mark = " (extrapolated)" if r["extrapolated"] else ""
        print(f"{r['model']:<15}{r['resolution']:>5}{r['batch']:>6}{r['steps']:>6}  {r['sampler']:<8}"
              f"{r['evaluations_per_image']:>10}{r['seconds']:>9.2f}{r['images_per_s']:>9.3f}"
              f"{1e3 * r['s_per_image_evaluation']:>9.2f}  {r['evaluations_per_image_100']:>24}"
              f"{r['images_per_s_100']:>10.4f}{1 / r['images_per_s_100']:>9.1f}{mark}")
    if args.json:
        write_json(args.json, {"args": vars(args), "machine": info, "results": results})


if __name__ == "__main__":
    main()
