"""Image decode, the ADM centre crop and encode: shared by the shard writer and the PIL loader."""

from __future__ import annotations

import io

from PIL import Image

# a 100-megapixel image is larger than any ImageNet photo; beyond it, refuse rather than OOM a worker
Image.MAX_IMAGE_PIXELS = 100_000_000

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def decode_rgb(data: bytes) -> Image.Image:
    """Decode and convert to RGB (CMYK, grayscale, palette, alpha all become RGB)."""
    # no `with`: the image reads from memory, and closing it would force a copy of the pixels
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "LA", "RGBA", "PA") or "transparency" in img.info:
        # composite onto white: dropping alpha would expose whatever colour hides under it
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The ADM / guided-diffusion ImageNet crop.

    Halve with a box filter while the short side is at least 2·size (cheap and
    alias-free), resize bicubic so the short side is `size`, crop the centre.
    """
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left = (img.size[0] - size) // 2
    top = (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def adm_geometry(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized width, height) and (left, top) of the crop that adm_center_crop applies.

    Lets a decoder that resizes in one pass (DALI) land on the same pixel grid.
    """
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
    scale = size / min(width, height)
    width, height = round(width * scale), round(height * scale)
    return (width, height), ((width - size) // 2, (height - size) // 2)


def encode(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt!r}: expected one of {sorted(FORMATS)}")
    out = io.BytesIO()
    if fmt == "jpg":
        img.save(out, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        img.save(out, "WEBP", lossless=True)
    else:
        img.save(out, "PNG", compress_level=6)
    return out.getvalue()

