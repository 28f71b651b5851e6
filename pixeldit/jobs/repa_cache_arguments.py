"""Arguments of `pixeldit repa-cache` (kept light: no torch import, so a bad flag fails fast)."""

from __future__ import annotations

import argparse


def add_repa_cache_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--data", required=True, help="image shards (manifest folder URL: path, s3://, gs://)")
    parser.add_argument("--out", required=True, help="feature shards folder URL (mirrors --data one to one)")
    parser.add_argument("--encoder", default="dinov2_vitb14",
                        help="DINOv2 weights: a file in Meta's or timm's layout, or a hub name (dinov2_vitb14)")
    parser.add_argument("--image-size", type=int, default=256, help="training resolution (encoder input 14*S/16)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "int8"], default="fp16",
                        help="storage: 16-bit floats, or int8 with a per-token scale (half the bytes)")
    parser.add_argument("--flip", choices=["none", "both", "grid"], default="none",
                        help="for training with random flips: none; both (features of both orientations, 2x "
                             "bytes); grid (mirror the token grid of the unflipped features at load time)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=4, help="image decode threads")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")
