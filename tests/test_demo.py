"""The README's first command, shortened: `pixeldit train` on its embedded default, from any directory."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from pixeldit.data_pipelines.synthetic import COLOURS, class_style


def colour_accuracy(grid_png: str, tile: int = 32, pad: int = 1, per_row: int = 4) -> float:
    """Share of samples whose bright pixels are closest, among the 5 palette colours, to their class's."""
    grid = np.asarray(Image.open(grid_png)).astype(np.float32)
    palette = np.array(COLOURS, dtype=np.float32)
    rows = (grid.shape[0] - pad) // (tile + pad)
    hits = total = 0
    for row in range(rows):
        for col in range(per_row):
            y, x = pad + row * (tile + pad), pad + col * (tile + pad)
            pixels = grid[y:y + tile, x:x + tile].reshape(-1, 3)
            bright = pixels[pixels.max(1) > 140]
            total += 1
            if len(bright) >= 5:
                guess = ((palette - bright.mean(0)) ** 2).sum(1).argmin()
                hits += tuple(palette[guess].astype(int)) == class_style(row)[1]
    return hits / total


def test_demo_learns_the_class_colours(tmp_path):
    # 3x the demo's lr over fewer steps. Measured on the EMA grids (AMD EPYC, this test's settings):
    # the default lr reads 0.275 at step 200 and 0.55 at 400, too near the bar; 3e-3 reads 0.375,
    # 0.7, 0.8, 0.85 at steps 100, 150, 200, 250.
    steps = 200
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pixeldit", "train", "--set", f"train.steps={steps}",
                           "--set", "schedule.stages[0].lr=3e-3", "--set", "logging.sample_every_steps=0",
                           "--set", f"checkpoint.every_steps={steps}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    assert f"trained {steps} steps (0 skipped) in {run}" in proc.stdout
    grid = run / "samples" / f"ema_step_{steps:08d}.png"
    assert f"EMA samples   {grid}" in proc.stdout
    assert (run / "checkpoints" / f"step_{steps:08d}" / "meta.json").exists()
    assert list((run / "tensorboard").iterdir())
    accuracy = colour_accuracy(str(grid))
    assert accuracy >= 0.5, accuracy  # chance is 0.2; the full 2000-step demo reaches ~0.9
