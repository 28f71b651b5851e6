"""TensorBoard scalars, a console line, a progress bar, and the run's provenance (rank 0 writes)."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
from importlib import metadata

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


def provenance(cfg, world: int) -> dict:
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


class Monitor:
    def __init__(self, cfg, run_dir: str, rank: int, world: int, device: torch.device, flops_per_image: float):
        self.cfg, self.run_dir, self.rank, self.world, self.device = cfg, run_dir, rank, world, device
        self.flops_per_image = flops_per_image
        self.peak = peak_tflops(device, cfg.logging.peak_tflops)
        self.writer = None
        self.bar = None
        self.window = []
        if rank == 0 and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log_run_info(self, resumed: bool):
        info = provenance(self.cfg, self.world)
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(self.cfg.to_yaml())
        with open(os.path.join(self.run_dir, "provenance.json"), "w") as f:
            json.dump(info, f, indent=1)
        if self.writer is not None:
            self.writer.add_text("run/config", "```\n" + self.cfg.to_yaml() + "\n```", 0)
            self.writer.add_text("run/provenance", "```\n" + json.dumps(info, indent=1) + "\n```", 0)
        from tqdm import tqdm
        self.bar = tqdm(total=self.cfg.train.steps, unit="step", desc="train", dynamic_ncols=True,
                        disable=not sys.stderr.isatty() and os.environ.get("PIXELDIT_PROGRESS") != "1")

    def step(self, state, metrics: dict, loader, ema, strategy):
        if self.rank != 0:
            return
        step = state.step
        self.window.append(metrics)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            self.bar.update(0)
        every = self.cfg.logging.every_steps
        if step % every and step != self.cfg.train.steps:
            return
        window, self.window = self.window, []
        step_time = sum(m["step_time"] for m in window) / len(window)
        data_share = sum(m["data_time"] for m in window) / max(sum(m["step_time"] for m in window), 1e-9)
        images_per_s = metrics["samples"] / step_time
        scalars = {
            "train/loss": metrics["loss"], "train/grad_norm": metrics["grad_norm"], "train/lr": metrics["lr"],
            "train/clip": metrics["clip"], "train/stage": metrics["stage"], "train/skipped_steps": state.skipped,
            "perf/images_per_s": images_per_s, "perf/step_time_s": step_time, "perf/data_wait_share": data_share,
            **loader.stats.scalars(), "data/epoch": loader.epoch,
            "memory/ema_bytes_per_rank": ema.local_bytes(),
        }
        if metrics.get("loss_repa") is not None:
            scalars["train/loss_repa"] = metrics["loss_repa"]
        if self.peak:
            scalars["perf/mfu"] = images_per_s * self.flops_per_image / (self.peak * 1e12 * self.world)
        if self.device.type == "cuda":
            scalars["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.add_scalars(scalars, step)
        log.info("step %d/%d  loss %.4f  grad %.3f  lr %.2e  clip %.2f  %.1f img/s  data %.0f%%  skipped %d",
                 step, self.cfg.train.steps, metrics["loss"], metrics["grad_norm"], metrics["lr"], metrics["clip"],
                 images_per_s, 100 * data_share, state.skipped)

    def add_scalars(self, scalars: dict, step: int):
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def add_images(self, tag: str, grid: torch.Tensor, step: int):
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
