"""Image decode, the ADM centre crop and encode: shared by the shard writer, the pil loader and its
decode processes (which is why this module imports neither torch nor the rest of the package)."""

from __future__ import annotations

import io
import re
from typing import Sequence

import numpy as np
import simplejpeg
from PIL import Image

# a 100-megapixel image is larger than any ImageNet photo; beyond it, refuse rather than OOM a worker
Image.MAX_IMAGE_PIXELS = 100_000_000

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# the members a sample's image is read from, first match wins (the loader's and the indexer's)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def failure_text(error: BaseException) -> str:
    """Why an image was skipped, as listed in a manifest."""
    # object addresses in messages would make two runs' manifests differ
    return re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", f"{type(error).__name__}: {error}")


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

    The whole image is resized although only the centre is kept: resizing just that window
    (Pillow's `box`) resamples in 17% less time but gives other pixels (off by 1 on most
    sizes tried, by up to 20 levels on some), and the crop must match the reference's.
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


_PIXEL = np.dtype("V3")  # one RGB pixel as a single element


def mirror(out: np.ndarray) -> None:
    """Flip (S, S, 3) uint8 pixels left-right in place.

    Moved as 3-byte elements: numpy reverses a (S, S, 3) byte view three bytes at a time, at
    361 µs a 256² image, as much as decoding it (measured); whole pixels take half of that.
    """
    pixels = out.view(_PIXEL)[..., 0]
    pixels[...] = pixels[:, ::-1].copy()  # the copy: source and destination overlap


def decode_into(data: bytes, out: np.ndarray, crop: bool, flip: bool = False) -> None:
    """Decode into `out`, (S, S, 3) uint8 in pixel order: the image's slot in its batch, mirrored
    left-right where `flip` says.

    YCbCr and grayscale JPEGs (ImageNet's photos, and everything the shard writer re-encodes) go
    through simplejpeg's libjpeg-turbo: the same pixels as Pillow's, ~10% less CPU, and a
    pre-cropped image is written straight into its slot, without a decoder-owned copy to batch.
    Anything else (CMYK, PNG, WebP...) goes through Pillow, which also names what is wrong. An
    image that passes through Pillow is mirrored there (4-byte pixels, a plain C loop: 5-10x
    cheaper than mirroring the slot).
    """
    size = out.shape[0]
    img = None
    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in ("YCbCr", "Gray") and height * width <= Image.MAX_IMAGE_PIXELS:
                if not crop and (height, width) == (size, size):
                    simplejpeg.decode_jpeg(data, "RGB", buffer=out)
                    if flip:
                        mirror(out)
                    return
                img = Image.fromarray(simplejpeg.decode_jpeg(data, "RGB"))
        except ValueError:
            pass  # truncated or unusual: Pillow below decodes it or says why not
    if img is None:
        img = decode_rgb(data)
    if crop or img.size != (size, size):
        img = adm_center_crop(img, size)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out[...] = np.asarray(img)


def decode_batch(datas: Sequence[bytes], out: np.ndarray, crop: bool, flips: Sequence[bool]) -> dict[int, str]:
    """Decode `datas` into consecutive slots of `out` (B, S, S, 3), flipping where `flips` says.

    An image that will not decode leaves no gap: the next one takes its slot. Returns why each
    failed one did, by its index in `datas`, so the caller can count and name the skipped samples.
    """
    failures, slot = {}, 0
    for index, (data, flip) in enumerate(zip(datas, flips)):
        try:
            decode_into(data, out[slot], crop, flip)
        except Exception as e:  # noqa: BLE001 - a corrupt image must not stop the run
            failures[index] = f"{type(e).__name__}: {e}"
            continue
        slot += 1
    return failures


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

