"""Helpers shared by the bench/ scripts: device-synced timing, a measured matmul peak, machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# CPU features that decide whether bf16 matmuls run natively or are emulated through fp32
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def sync(device: torch.device) -> None:
    # CUDA calls return before the kernel finishes; without this we would time the launch only
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int, log=None) -> list[float]:
    """Seconds per call for `steps` calls after `warmup` untimed ones (allocator, oneDNN/cuBLAS setup).

    `log(kind, i, seconds)`, if given, sees every call as it ends: slow runs show progress
    and a run killed part-way still leaves figures.
    """
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        sync(device)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
        if log:
            log("warmup" if i < warmup else "step", i - warmup if i >= warmup else i, elapsed)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5,
                min_rep_s: float = 0.2) -> float:
    """Best-of-`reps` GFLOP/s of an n×n×n matmul in `dtype`, in nn.Linear's layout (x @ W.T).

    Measured in-process so it reflects this library build, thread count and clock,
    which a datasheet peak does not. The layout matters: on AVX2-only CPUs a bf16
    torch.mm(a, b) of two row-major matrices falls back to a ~1 GFLOP/s kernel
    while x @ W.T runs ~20x faster, and the model's forward linears use the latter.
    Each rep repeats the matmul until it lasts `min_rep_s`, so fast GPUs are not
    timed on a single microsecond-scale call.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    once = median(timed(lambda: F.linear(a, b), device, steps=1, warmup=1))
    inner = max(1, int(min_rep_s / max(once, 1e-9)))

    def rep():
        for _ in range(inner):
            F.linear(a, b)

    best = min(timed(rep, device, steps=reps, warmup=0)) / inner
    return 2 * n ** 3 / best / 1e9


def machine(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags(),
        "python": platform.python_version(),
        # other processes on a small machine skew every figure; record it so a reader can tell
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FLAGS if f in present]
    return []


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
