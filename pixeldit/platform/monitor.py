"""The console (start-up banner, log lines with ETA, progress bar), the trackers (TensorBoard,
Weights & Biases: platform/trackers.py) and the run's provenance; rank 0 writes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import torch

log = logging.getLogger("pixeldit.train")

# dense bf16 peak TFLOP/s per device (vendor figures); MFU is reported against these
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}
SECRET = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.IGNORECASE)


def peak_tflops(device: torch.device, configured: float) -> float | None:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def provenance(world: int) -> dict:
    """Resolved config, git SHA, package versions and the launch environment, credentials redacted."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(__file__)).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    versions = {}
    for pkg in ("torch", "deepspeed", "nvidia-dali-cuda130", "webdataset", "timm", "fsspec", "s3fs", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    env = {k: ("<redacted>" if SECRET.search(k) else v) for k, v in sorted(os.environ.items())
           if k.startswith(("RANK", "WORLD", "LOCAL_", "MASTER_", "NCCL_", "OMP_", "SLURM_", "TORCH", "DS_",
                            "AWS_", "CUDA_", "PIXELDIT"))}
    return {"git_sha": sha, "python": sys.version.split()[0], "platform": platform.platform(), "world": world,
            "packages": versions, "env": env, "argv": sys.argv}


def duration(seconds: float) -> str:
    """H:MM:SS, with days in front past 24 h (a 1.6M-step ETA is days)."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest // 60 % 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def window_mean(values) -> float:
    """Mean of the finite values (a skipped step's NaN would hide the others); NaN if none is."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


@dataclass(frozen=True)
class MonitorSpec:
    total_steps: int        # train.steps
    log_every: int          # logging.every_steps
    peak_tflops: float      # logging.peak_tflops; 0 looks the device up in PEAK_TFLOPS
    flops_per_image: float  # one training forward and backward
    config_yaml: str        # the resolved config, written beside the run and to the trackers


class Monitor:
    """Rank 0's console (banner, log lines, progress bar) and trackers; on other ranks it does nothing."""

    def __init__(self, spec: MonitorSpec, run_dir: str, rank: int, world: int, device: torch.device,
                 open_trackers: Callable[[], list]):
        self.spec, self.run_dir, self.rank, self.world, self.device = spec, run_dir, rank, world, device
        self.open_trackers = open_trackers
        self.flops_per_image = spec.flops_per_image
        self.peak = peak_tflops(device, spec.peak_tflops)
        self.bar = None
        self.window = []
        self.clock = {"start": time.perf_counter(), "step": 0}
        self.console = contextlib.ExitStack()
        self.trackers = []

    def start(self, step: int, banner: list[str]):
        """Open the trackers, write the run's provenance, log the banner, start the clock and the bar at `step`.

        Called once training is certain to run: a finished run or a refused resume opens no tracker
        (no empty TensorBoard event file, no W&B run resumed for nothing)."""
        self.clock = {"start": time.perf_counter(), "step": step}
        if self.rank != 0:
            return
        self.trackers = self.open_trackers()
        info = provenance(self.world)
        config_yaml = self.spec.config_yaml
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
        with open(os.path.join(self.run_dir, "provenance.json"), "w") as f:
            json.dump(info, f, indent=1)
        for tracker in self.trackers:
            tracker.log_config(config_yaml, info)
        log.info("\n  ".join(banner))
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
        self.bar = tqdm(total=self.spec.total_steps, initial=step, unit="step", desc="train", dynamic_ncols=True,
                        disable=not sys.stderr.isatty() and os.environ.get("PIXELDIT_PROGRESS") != "1")
        if not self.bar.disable:
            # log records go through tqdm.write while the bar is up: it lifts the bar, prints the line,
            # redraws the bar, so neither writes over the other
            self.console.enter_context(logging_redirect_tqdm())

    def step(self, state, metrics: dict, loader, ema):
        if self.rank != 0:
            return
        step = state.step
        self.window.append(metrics)
        if step == self.clock["step"] + 1:
            # the rate behind the ETA leaves out the first step (start-up, compilation, first reads)
            self.clock["first"] = (time.perf_counter(), step)
        loss = window_mean(m["loss"] for m in self.window)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(0)
        if step % self.spec.log_every and step != self.spec.total_steps:
            return
        window, self.window = self.window, []
        step_time = sum(m["step_time"] for m in window) / len(window)
        data_share = sum(m["data_time"] for m in window) / max(sum(m["step_time"] for m in window), 1e-9)
        images_per_s = metrics["samples"] / step_time
        scalars = {
            "train/loss": loss, "train/grad_norm": metrics["grad_norm"], "train/lr": metrics["lr"],
            "train/clip": metrics["clip"], "train/stage": metrics["stage"], "train/skipped_steps": state.skipped,
            "perf/images_per_s": images_per_s, "perf/step_time_s": step_time, "perf/data_wait_share": data_share,
            **loader.stats.scalars(), "data/epoch": loader.epoch,
            "memory/ema_bytes_per_rank": ema.local_bytes(),
        }
        if metrics.get("loss_repa") is not None:
            scalars["train/loss_repa"] = window_mean(m["loss_repa"] for m in window)
        if self.peak:
            scalars["perf/mfu"] = images_per_s * self.flops_per_image / (self.peak * 1e12 * self.world)
        if self.device.type == "cuda":
            scalars["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.add_scalars(scalars, step)
        now = time.perf_counter()
        t_first, first = self.clock.get("first", (self.clock["start"], self.clock["step"]))
        if step == first:
            t_first, first = self.clock["start"], self.clock["step"]
        # wall time per step, saves, previews and evaluations included: what the remaining steps will cost
        per_step = (now - t_first) / max(step - first, 1)
        repa = f"  repa {scalars['train/loss_repa']:.4f}" if "train/loss_repa" in scalars else ""
        # data retries and skipped samples on the console too: a storage brown-out or a bad shard must
        # be visible without opening TensorBoard
        log.info("step %d/%d  loss %.4f (mean of %d)%s  grad %.3f  lr %.2e  clip %.2f  %.1f img/s  data %.0f%%  "
                 "skipped steps %d  data retries %d  data skipped %d  elapsed %s  eta %s", step,
                 self.spec.total_steps, loss, len(window), repa, metrics["grad_norm"], metrics["lr"], metrics["clip"],
                 images_per_s, 100 * data_share, state.skipped, loader.stats.retries,
                 sum(loader.stats.skipped.values()), duration(now - self.clock["start"]),
                 duration(per_step * (self.spec.total_steps - step)))

    def add_scalars(self, scalars: dict, step: int):
        for tracker in self.trackers:
            tracker.log_scalars(scalars, step)

    def add_images(self, tag: str, grid: torch.Tensor, step: int):
        for tracker in self.trackers:
            tracker.log_image(tag, grid, step)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.console.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
