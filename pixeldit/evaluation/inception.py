"""Inception-v3 as the FID standard uses it: the TensorFlow graph of 2015-12-05, ported to PyTorch.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (FID_WEIGHTS_URL) or torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (FIDELITY_WEIGHTS_URL). Both were converted from the
TF graph to torchvision's module names (`Conv2d_1a_3x3.conv.weight`, `Mixed_6d.branch1x1.bn.running_var`,
..., `fc.weight` of shape (1008, 2048)), so one loader reads either; torchvision's own ImageNet
Inception (1000 classes, other weights) is refused by its fc shape.

Per image (uint8, any size; resized to 299x299 with bilinear interpolation, align_corners=False, as
pytorch-fid does, then scaled to [-1, 1]):

- `pool`     (2048,) the pool_3 features of FID, precision and recall;
- `spatial`  (2023,) the sFID features of the ADM evaluator: `mixed_6/conv` (= Mixed_6d.branch1x1
             after its ReLU), first 7 channels, flattened in TF's (17, 17, 7) HWC order so our
             statistics compare with the mu_s / sigma_s stored in ADM reference batches;
- `logits`   (1008,) pool_3 times the softmax weight *without* the bias, as the ADM evaluator
             feeds its Inception Score (torch-fidelity's "logits_unbiased").

Weights come from `load_inception(path_or_url)`; with no argument, from $PIXELDIT_INCEPTION.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

from ..errors import MissingFileError, WeightsError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FIDELITY_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                        "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "PIXELDIT_INCEPTION"
POOL_DIM, SPATIAL_DIM, LOGIT_DIM = 2048, 7 * 17 * 17, 1008


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor      # (N, 2048)
    spatial: torch.Tensor   # (N, 2023)
    logits: torch.Tensor    # (N, 1008), no bias


def _tf_avg_pool(x):
    # TF's SAME-padded average pool divides by the number of in-image pixels, not by 9
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(tv.InceptionA):
    def _forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), double,
                self.branch_pool(_tf_avg_pool(x))]


class _FIDInceptionC(tv.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d7 = conv(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(_tf_avg_pool(x))]


class _FIDInceptionE(tv.InceptionE):
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        # the 2015 graph max-pools in its last block (mixed_10) where the paper averages
        self.max_pool = max_pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1), self.branch_pool(pooled)]


class FIDInceptionV3(nn.Module):
    """The FID Inception with torchvision's module names; forward(uint8 NCHW) -> InceptionFeatures."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = tv.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = tv.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = tv.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = tv.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = tv.BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = tv.InceptionB(288)
        self.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = tv.InceptionD(768)
        self.Mixed_7b = _FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, LOGIT_DIM)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception expects uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.fc.weight.device, torch.float32) / 127.5 - 1
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d._forward(x)
        spatial = branches[0][:, :7].permute(0, 2, 3, 1).flatten(1)
        x = torch.cat(branches, 1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return InceptionFeatures(pool, spatial, pool @ self.fc.weight.T)


@contextlib.contextmanager
def full_fp32():
    """Run convolutions in true fp32: PyTorch's default TF32 convolutions keep 10 mantissa bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _read_state_dict(source: str) -> dict:
    if source.startswith(("http://", "https://")):
        # no check_hash: whether "6726825d" in the release names is a SHA-256 prefix is unverified (pytorch-fid
        # and torch-fidelity do not check it either); the layout and shape checks below still apply
        try:
            return torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True)
        except OSError as e:  # URLError, timeouts, refused connections: offline machines are common
            raise WeightsError(f"{source}: could not fetch the Inception weights ({type(e).__name__}: {e}); "
                               f"download the file elsewhere and pass --inception PATH") from None
    if not os.path.isfile(source):
        raise MissingFileError(f"{source}: no such Inception weights file")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # a bad pickle, a bad zip, a short file
        raise WeightsError(f"{source}: cannot be read as a torch state dict ({type(e).__name__}: {e})") from e
    return state


def load_inception(source: str | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception from a local .pth (pytorch-fid or torch-fidelity layout) or an https URL.

    `source` None reads $PIXELDIT_INCEPTION. An unknown layout, a missing or mis-shaped tensor is a
    ValueError naming the file and the first offending key.
    """
    source = source or os.environ.get(INCEPTION_ENV)
    if not source:
        raise WeightsError(f"no Inception weights: pass --inception PATH or set {INCEPTION_ENV} "
                         f"(download {FID_WEIGHTS_URL})")
    state = _read_state_dict(source)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "Mixed_7c.branch_pool.conv.weight" not in state:
        first = ", ".join(list(state)[:3]) or "none"
        raise WeightsError(f"{source}: unknown Inception weights layout (expected torchvision module names as in "
                         f"pytorch-fid's / torch-fidelity's file, e.g. Mixed_7c.branch_pool.conv.weight; "
                         f"first keys: {first})")
    model = FIDInceptionV3()
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    for key, value in expected.items():
        if key not in state:
            raise WeightsError(f"{source}: missing Inception weight {key}")
        if state[key].shape != value.shape:
            raise WeightsError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
                             + (" (torchvision's ImageNet Inception is not the FID network)" if key == "fc.weight"
                                else ""))
    # the converted files carry no num_batches_tracked (unused in eval) and nothing else we read
    model.load_state_dict({k: state[k] for k in expected}, strict=False)
    return model.to(device).eval().requires_grad_(False)
