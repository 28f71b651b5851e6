"""Arguments of `pixeldit evaluate` (kept light: no torch import, so a bad flag fails fast)."""

from __future__ import annotations

import argparse
import os

from .argument_types import positive_int

INCEPTION_ENV = "PIXELDIT_INCEPTION"  # pixeldit.evaluation.inception.INCEPTION_ENV, without importing torch


def add_evaluate_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Inception Score, FID, sFID, precision and recall of a sample batch against a reference batch, in the "
        "ADM evaluation suite's format (arr_0: uint8 N x H x W x 3). Paper numbers are against "
        "VIRTUAL_imagenet256_labeled.npz; the protocol is in docs/evaluation.md.")
    parser.add_argument("samples", help="samples .npz (arr_0 uint8 images, optional arr_1 labels)")
    parser.add_argument("--ref", required=True,
                        help="reference .npz: arr_0 images and/or precomputed mu, sigma, mu_s, sigma_s")
    parser.add_argument("--inception", default=os.environ.get(INCEPTION_ENV),
                        help="FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or "
                             "torch-fidelity's weights-inception-2015-12-05-6726825d.pth, a path or an https URL "
                             f"(default: ${INCEPTION_ENV})")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per Inception batch")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    parser.add_argument("--frechet", choices=["sqrtm", "eigh"], default="sqrtm",
                        help="matrix square root of the Fréchet distance: sqrtm (the ADM suite's, default) or "
                             "eigh (symmetric eigendecomposition: ~4x faster, same value to ~1e-9 on full-rank "
                             "statistics)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
