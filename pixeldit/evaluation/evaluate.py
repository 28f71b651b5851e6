"""Inception Score, FID, sFID, precision and recall of an .npz of samples (the verb: jobs/evaluate.py).

Inputs are the ADM evaluation suite's: samples `arr_0` uint8 (N, H, W, 3) (optional `arr_1`
labels); a reference with `arr_0` images and/or precomputed `mu`, `sigma` (pool3) and `mu_s`,
`sigma_s` (sFID), like VIRTUAL_imagenet256_labeled.npz. As in the ADM suite, precomputed statistics
win over the reference images (for ImageNet they cover the whole training set; the 10k images are
there for precision / recall). Without reference images precision / recall are reported as
unavailable. See docs/evaluation.md for the protocol behind the paper's numbers.

Library:

    evaluate_npz(samples_path, ref_path, inception_path=None, batch_size=100, device=None) -> dict

FID inside the training loop, without files:

    inception = load_inception(path, device)                          # once
    ref = read_reference("VIRTUAL_imagenet256_labeled.npz")           # once: ref["mu"], ref["sigma"]
    fid = fid_from_uint8(images, ref["mu"], ref["sigma"], inception)  # images: uint8 (N, 3, H, W)

or, to accumulate over batches (and ranks: all-reduce `count`, `total`, `outer` with SUM first),
`stats = InceptionStats(inception); stats.update(batch) ...; stats.fid(mu, sigma)`.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError, MissingFileError
from .inception import POOL_DIM, SPATIAL_DIM, FIDInceptionV3, InceptionFeatures, full_fp32, load_inception
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3


def _npz_keys(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            return [name[:-4] for name in zf.namelist() if name.endswith(".npy")]
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not an .npz file") from None


def _read_header(f):
    # format 3.0 differs from 2.0 only in allowing utf-8 field names, which image arrays never have
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)  # (shape, fortran_order, dtype)


def image_count(path: str, keys: list[str] | None = None) -> tuple[int, int, int]:
    """(N, H, W) of arr_0 from the header alone; a ValueError naming the file unless uint8 (N, H, W, 3)."""
    keys = _npz_keys(path) if keys is None else keys
    if "arr_0" not in keys:
        raise DataError(f"{path}: no arr_0 images (arrays: {', '.join(keys) or 'none'})")
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, _, dtype = _read_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise DataError(f"{path}: arr_0 must be uint8 images of shape (N, H, W, 3), got {dtype} {tuple(shape)}")
    if shape[0] < 2:
        raise DataError(f"{path}: arr_0 holds {shape[0]} image(s); statistics need at least 2")
    return shape[0], shape[1], shape[2]


def iter_image_batches(path: str, batch_size: int):
    """arr_0 in batches, streamed from the zip member: 50k images at 512 px are 39 GB."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, fortran, dtype = _read_header(f)
        if fortran:  # rare enough to afford reading the whole array
            images = np.load(path)["arr_0"]
            yield from (images[i:i + batch_size] for i in range(0, len(images), batch_size))
            return
        image_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * image_bytes)
            if len(data) != n * image_bytes:
                raise DataError(f"{path}: arr_0 is truncated at image {start}")
            yield np.frombuffer(bytearray(data), dtype).reshape(n, *shape[1:])


def read_reference(path: str) -> dict:
    """Precomputed statistics of a reference .npz (float64) and its image count (0 without arr_0)."""
    keys = _npz_keys(path)
    reference = {"images": image_count(path, keys)[0] if "arr_0" in keys else 0}
    with np.load(path) as npz:
        for mu_key, sigma_key, dim in (("mu", "sigma", POOL_DIM), ("mu_s", "sigma_s", SPATIAL_DIM)):
            if mu_key not in keys and sigma_key not in keys:
                continue
            for key, shape in ((mu_key, (dim,)), (sigma_key, (dim, dim))):
                if key not in keys:
                    raise DataError(f"{path}: has {mu_key if key == sigma_key else sigma_key} but no {key}")
                value = npz[key]
                if value.shape != shape:
                    raise DataError(f"{path}: {key} has shape {value.shape}, expected {shape}")
                reference[key] = value.astype(np.float64)
    if not reference["images"] and "mu" not in reference:
        raise DataError(f"{path}: a reference needs arr_0 images or mu and sigma "
                         f"(arrays: {', '.join(keys) or 'none'})")
    return reference


def extract_features(path: str, inception: FIDInceptionV3, batch_size: int = 100) -> InceptionFeatures:
    n = image_count(path)[0]
    device = inception.fc.weight.device
    parts = []
    with full_fp32(), tqdm(total=n, unit="img", desc=f"Inception {os.path.basename(path)}") as bar:
        for batch in iter_image_batches(path, batch_size):
            images = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
            parts.append([f.cpu() for f in inception(images)])
            bar.update(len(batch))
    return InceptionFeatures(*(torch.cat(column) for column in zip(*parts)))


def _labels_sorted(path: str, keys: list[str], n: int) -> bool:
    if "arr_1" not in keys:
        return False
    with np.load(path) as npz:
        labels = npz["arr_1"]
    return labels.shape == (n,) and labels[0] != labels[-1] and bool(np.all(np.diff(labels) >= 0))


def evaluate_npz(samples_path: str, ref_path: str, inception_path: str | None = None, batch_size: int = 100,
                 device: str | None = None, frechet: str = "sqrtm",
                 inception: FIDInceptionV3 | None = None) -> dict:
    """All metrics of a sample batch against a reference batch; None where a metric is unavailable."""
    sample_keys = _npz_keys(samples_path)
    n, height, width = image_count(samples_path, sample_keys)
    reference = read_reference(ref_path)  # both files are checked before any Inception work
    if inception is None:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        inception = load_inception(inception_path, device)
    device = inception.fc.weight.device
    samples = extract_features(samples_path, inception, batch_size)
    ref_features = extract_features(ref_path, inception, batch_size) if reference["images"] else None

    result = {"samples": samples_path, "num_samples": n, "image_size": [height, width], "reference": ref_path,
              "num_reference_images": reference["images"], "frechet_method": frechet}
    # ADM scores consecutive splits of 5000: a file sorted by class (some samplers write that)
    # would put 100 classes in each split and cap the score near 100, so score a fixed shuffle instead
    order = None
    if _labels_sorted(samples_path, sample_keys, n):
        order = torch.from_numpy(np.random.default_rng(0).permutation(n))
    result["inception_score"] = inception_score(samples.logits if order is None else samples.logits[order],
                                                IS_SPLIT_SIZE)
    result["inception_score_splits"] = "shuffled (arr_1 is sorted by class)" if order is not None else "file order"
    for name, mu_key, sigma_key, field in (("fid", "mu", "sigma", "pool"), ("sfid", "mu_s", "sigma_s", "spatial")):
        if mu_key in reference:
            ref_mu, ref_sigma, source = reference[mu_key], reference[sigma_key], "precomputed"
        elif ref_features is not None:
            (ref_mu, ref_sigma), source = feature_statistics(getattr(ref_features, field)), "from reference images"
        else:
            result[name], result[f"{name}_reference"] = None, "unavailable"
            continue
        mu, sigma = feature_statistics(getattr(samples, field))
        result[name] = frechet_distance(mu, sigma, ref_mu, ref_sigma, method=frechet)
        result[f"{name}_reference"] = source
    if ref_features is not None and min(len(ref_features.pool), n) > PR_NEIGHBOURS:
        result["precision"], result["recall"] = precision_recall(ref_features.pool, samples.pool, PR_NEIGHBOURS,
                                                                 device=device)
    else:
        result["precision"] = result["recall"] = None
    return result


class InceptionStats:
    """Running mean and covariance of pool3 features (float64 sums on the Inception's device)."""

    def __init__(self, inception: FIDInceptionV3):
        self.inception = inception
        device = inception.fc.weight.device
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(POOL_DIM, dtype=torch.float64, device=device)
        self.outer = torch.zeros(POOL_DIM, POOL_DIM, dtype=torch.float64, device=device)

    def update(self, images: torch.Tensor):
        """images: uint8 (B, 3, H, W), the layout of the data pipeline and of samplers.to_uint8."""
        with full_fp32():
            features = self.inception(images).pool.double()
        self.count += len(features)
        self.total += features.sum(0)
        self.outer += features.T @ features

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.count.item())
        if n < 2:
            raise DataError(f"FID statistics need at least 2 images, got {n}")
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def fid(self, ref_mu, ref_sigma, method: str = "sqrtm") -> float:
        mu, sigma = self.compute()
        return frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method)


def fid_from_uint8(images: torch.Tensor, ref_mu, ref_sigma, inception: FIDInceptionV3, batch_size: int = 100,
                   method: str = "sqrtm") -> float:
    stats = InceptionStats(inception)
    for batch in images.split(batch_size):
        stats.update(batch)
    return stats.fid(ref_mu, ref_sigma, method)
