"""Train-step time of a PixelDiT model: forward + backward + AdamW step.

    python bench/model_step.py --model pixeldit-b --resolution 256 --batch 4 --dtype both

Reports, per dtype, the median step time, images/s, achieved GFLOP/s (analytic
training FLOPs, i.e. matmuls only, over measured time) and the ratio to a matmul
peak measured in the same run on the same device and dtype. That ratio is an
MFU against what this machine can actually do, not against a datasheet number.
bf16 means autocast with fp32 master weights, as training uses it.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from _common import DTYPES, machine, matmul_peak, median, timed, write_json
from pixeldit.models import PRESETS, build_model, training_flops


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pixeldit-b", choices=sorted(PRESETS))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--fused", action="store_true",
                    help="AdamW(fused=True); the default is torch's per-device choice (a per-tensor loop on CPU)")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul for the peak")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after timing, profile one step per dtype and print the top ROWS ops")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    return ap.parse_args()


def make_step(args, device: torch.device, dtype: str):
    torch.manual_seed(0)
    model = build_model(args.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if args.fused else None)
    B, R = args.batch, args.resolution
    x = torch.rand(B, 3, R, R, device=device) * 2 - 1
    t = torch.rand(B, device=device)
    y = torch.randint(0, model.num_classes + 1, (B,), device=device)
    target = torch.randn_like(x)

    def autocast():
        if dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(x, t, y)
        F.mse_loss(out.float(), target).backward()
        opt.step()

    return model, step


def profile_step(step, device: torch.device, rows: int) -> None:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]

    info = machine(device)
    print(f"device {device} | {info.get('gpu', info['cpu'])} | {info['threads']} threads | "
          f"torch {info['torch']} ({info['cpu_capability']}) | cpu flags: {' '.join(info['cpu_flags'])} | "
          f"load {info['loadavg_1m']}")

    if "bf16" in dtypes and device.type == "cpu" and not {"avx512_bf16", "amx_bf16"} & set(info["cpu_flags"]):
        print("note: this CPU has neither avx512_bf16 nor AMX; bf16 matmuls run on fallback kernels, "
              "expect bf16 to be much slower than fp32")
    results = []
    for dtype in dtypes:
        model, step = make_step(args, device, dtype)
        flops_per_step = training_flops(model.arch, args.resolution, args.resolution) * args.batch
        times = timed(step, device, args.steps, args.warmup,
                      log=lambda kind, i, s: print(f"  {dtype} {kind} {i}: {s:.3f} s", flush=True))
        step_s = median(times)
        achieved = flops_per_step / step_s / 1e9
        peak = matmul_peak(device, DTYPES[dtype], n=args.peak_n)
        results.append({
            "dtype": dtype, "step_s": step_s, "step_s_all": times,
            "images_per_s": args.batch / step_s, "train_gflop_per_step": flops_per_step / 1e9,
            "achieved_gflops": achieved, "peak_gflops": peak, "mfu_vs_peak": achieved / peak,
        })
        if args.profile:
            print(f"-- profile, one {dtype} step --")
            profile_step(step, device, args.profile)
        del model, step

    print(f"\n{args.model} {args.resolution}x{args.resolution} batch {args.batch}: "
          f"{results[0]['train_gflop_per_step']:.1f} training GFLOP/step (analytic, matmuls), "
          f"median of {args.steps} steps after {args.warmup} warmup")
    print(f"{'dtype':<6}{'step s':>9}{'img/s':>9}{'GFLOP/s':>10}{'peak GFLOP/s':>14}{'MFU vs peak':>13}")
    for r in results:
        print(f"{r['dtype']:<6}{r['step_s']:>9.3f}{r['images_per_s']:>9.2f}{r['achieved_gflops']:>10.1f}"
              f"{r['peak_gflops']:>14.1f}{r['mfu_vs_peak']:>12.1%}")

    if args.json:
        write_json(args.json, {"args": vars(args), "machine": info,
                               "peak_matmul": f"{args.peak_n}^3 F.linear (x @ W.T), best of 5", "results": results})


if __name__ == "__main__":
    main()
