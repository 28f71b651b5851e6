"""Real photographs (bundled with scikit-image) laid out as a small ImageNet-style folder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")


def _photo(name: str) -> np.ndarray:
    import skimage.data
    return getattr(skimage.data, name)()


def make_photo_folder(root: Path, classes: int = 4, per_class: int = 6, seed: int = 0,
                      with_bad: bool = True) -> dict:
    """Class folders of JPEGs cut from real photos at ImageNet-like sizes (~300-500 px, mixed aspect).

    With `with_bad`, class 0 also gets the awkward cases a real crawl has: CMYK and
    grayscale JPEGs, a palette PNG, an RGBA PNG, a truncated JPEG and a text file
    named .JPEG. Returns what was made (paths of the bad ones under "corrupt").
    """
    rng = np.random.default_rng(seed)
    photos = [_photo(n) for n in PHOTOS]
    made = {"images": 0, "corrupt": []}
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            src = photos[(c * per_class + i) % len(photos)]
            h = int(rng.integers(min(280, src.shape[0]), min(500, src.shape[0]) + 1))
            w = int(rng.integers(min(280, src.shape[1]), min(500, src.shape[1]) + 1))
            y = int(rng.integers(0, src.shape[0] - h + 1))
            x = int(rng.integers(0, src.shape[1] - w + 1))
            img = Image.fromarray(src[y:y + h, x:x + w])
            img.save(folder / f"n{c:08d}_{i}.JPEG", quality=int(rng.integers(75, 96)))
            made["images"] += 1
    if with_bad:
        folder = root / "n00000000"
        base = Image.fromarray(photos[0][:320, :400])
        base.convert("CMYK").save(folder / "cmyk.JPEG")
        base.convert("L").save(folder / "gray.JPEG")
        base.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
        Image.fromarray(_photo("logo")).save(folder / "rgba.png")
        made["images"] += 4
        data = io.BytesIO()
        base.save(data, "JPEG")
        (folder / "truncated.JPEG").write_bytes(data.getvalue()[:2000])
        (folder / "notes.JPEG").write_text("this is not an image")
        made["corrupt"] += [str(folder / "truncated.JPEG"), str(folder / "notes.JPEG")]
    return made
