"""Experiment trackers behind one interface: TensorBoard (default) and Weights & Biases (optional).

The monitor hands every tracker the same things (the resolved config and provenance once,
scalars and uint8 image grids keyed by the training step), so a value logged to one is
logged to all. Only rank 0 builds trackers, once training starts (Monitor.start).
"""

from __future__ import annotations

import json
import os
import secrets

import torch

from ..errors import ConfigError


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log_config(self, config_yaml: str, provenance: dict):
        self.writer.add_text("run/config", "```\n" + config_yaml + "\n```", 0)
        self.writer.add_text("run/provenance", "```\n" + json.dumps(provenance, indent=1) + "\n```", 0)

    def log_scalars(self, scalars: dict, step: int):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def log_image(self, tag: str, grid: torch.Tensor, step: int):
        self.writer.add_image(tag, grid, step)

    def close(self):
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    """One W&B run per run directory: its id is kept in <run_dir>/wandb_run_id, so a resumed
    training continues the same W&B run. WANDB_MODE=offline (or `wandb offline`) writes under
    <run_dir>/wandb/ for a later `wandb sync`; WANDB_DIR, WANDB_ENTITY and the other WANDB_*
    variables are wandb's own."""

    name = "wandb"

    # the x axis of every metric: the training step, not wandb's per-call counter, so that a resumed
    # run that repeats steps since its last checkpoint is not refused as "step went backwards"
    STEP = "trainer/step"

    def __init__(self, run_dir: str, project: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("logging.wandb=true: the wandb package is not installed; pip install "
                              "'pixeldit[wandb]' or set logging.wandb=false") from e
        id_file = os.path.join(run_dir, "wandb_run_id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(6)  # wandb ids: lower-case letters and digits
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        try:
            self.run = wandb.init(project=project, id=run_id, resume="allow", config=config,
                                  name=os.path.basename(os.path.abspath(run_dir)),
                                  dir=None if os.environ.get("WANDB_DIR") else run_dir)
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError, wandb.errors.CommError) as e:
            raise ConfigError(f"logging.wandb=true: wandb could not start a run ({e}); run `wandb login` or set "
                              f"WANDB_API_KEY, or set WANDB_MODE=offline and `wandb sync` later") from e
        self.run.define_metric(self.STEP)
        self.run.define_metric("*", step_metric=self.STEP)
        self.wandb = wandb

    def log_config(self, config_yaml: str, provenance: dict):
        # the config went to wandb.init (it is the run's config there); the provenance joins it
        self.run.config.update({"provenance": provenance}, allow_val_change=True)

    def log_scalars(self, scalars: dict, step: int):
        self.run.log({self.STEP: step, **scalars})

    def log_image(self, tag: str, grid: torch.Tensor, step: int):
        self.run.log({self.STEP: step, tag: self.wandb.Image(grid.permute(1, 2, 0).cpu().numpy())})

    def close(self):
        self.run.finish()


def tracker_names(cfg) -> list[str]:
    """The trackers this config logs to, in the order of build_trackers' list."""
    return [t.name for t, on in ((TensorBoardTracker, cfg.logging.tensorboard), (WandbTracker, cfg.logging.wandb))
            if on]


def build_trackers(cfg, run_dir: str) -> list:
    # W&B first: it is the one a user's setup can refuse (credentials), and then no TensorBoard file is written
    wandb = WandbTracker(run_dir, cfg.logging.wandb_project, cfg.to_dict()) if cfg.logging.wandb else None
    trackers = [TensorBoardTracker(run_dir)] if cfg.logging.tensorboard else []
    return trackers + ([wandb] if wandb else [])
