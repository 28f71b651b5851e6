"""Demo data: coloured shapes on textured backgrounds, one (shape, colour) pair per class.

Small enough to write in seconds, structured enough that a tiny PixelDiT
visibly learns the classes on a CPU in minutes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 200, 30), (170, 60, 200))
CLASSES = [f"{SHAPES[i % 5]}_{['red', 'green', 'blue', 'yellow', 'purple'][(i + i // 5) % 5]}" for i in range(10)]


def class_style(label: int) -> tuple[str, tuple[int, int, int]]:
    return SHAPES[label % 5], COLOURS[(label + label // 5) % 5]


def render(index: int, label: int, size: int, seed: int = 0) -> Image.Image:
    """Image `index` of class `label`: position, scale and background vary with (seed, index)."""
    rng = np.random.default_rng([seed, index])
    shape, colour = class_style(label)
    # dark, nearly flat backgrounds: the class lives in the shape and its colour, which a tiny
    # model should pick up in minutes
    base = rng.integers(20, 70, size=3)
    noise = rng.integers(-4, 5, size=(size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(r, size - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    jitter = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in colour)
    if shape == "circle":
        draw.ellipse(box, fill=jitter)
    elif shape == "square":
        draw.rectangle(box, fill=jitter)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=jitter)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=jitter)
    else:
        draw.ellipse(box, outline=jitter, width=max(2, int(r / 3)))
    return img
