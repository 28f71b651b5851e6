"""`pixeldit evaluate`: Fréchet distance, Inception Score, precision/recall, the FID Inception, the command.

The Inception runs with random weights written in pytorch-fid's layout by the test itself (the real
file is a 92 MB download); images are few and small, since every image is resized to 299 px anyway.
"""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy import linalg

from pixeldit.cli import build_parser, main
from pixeldit.evaluation import metrics
from pixeldit.evaluation.evaluate import InceptionStats, extract_features, fid_from_uint8
from pixeldit.evaluation.inception import load_inception
from pixeldit.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)

METHODS = ["sqrtm", "eigh"]


# ---- Fréchet distance -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances(method):
    rng = np.random.default_rng(0)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method) == pytest.approx(expected, rel=1e-10)
    # a common rotation leaves the distance unchanged and makes the covariances non-diagonal
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T, method=method)
    assert rotated == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_is_zero_on_equal_statistics_and_symmetric(method):
    rng = np.random.default_rng(1)
    mu1, s1 = feature_statistics(rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)))
    mu2, s2 = feature_statistics(rng.standard_normal((300, 32)) + 0.3)
    assert abs(frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-8
    forward, backward = frechet_distance(mu1, s1, mu2, s2, method=method), frechet_distance(mu2, s2, mu1, s1,
                                                                                             method=method)
    assert forward > 1.0 and forward == pytest.approx(backward, rel=1e-10)


def test_sqrtm_and_eigh_agree_on_full_rank_statistics():
    rng = np.random.default_rng(2)
    mu1, s1 = feature_statistics(rng.standard_normal((2000, 64)) @ rng.standard_normal((64, 64)))
    mu2, s2 = feature_statistics(rng.gamma(2.0, size=(2000, 64)))
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(
        frechet_distance(mu1, s1, mu2, s2, method="eigh"), rel=1e-9)


def test_frechet_distance_retries_with_an_offset_when_sqrtm_is_not_finite(monkeypatch):
    rng = np.random.default_rng(3)
    mu, s1 = feature_statistics(rng.standard_normal((100, 8)))
    _, s2 = feature_statistics(rng.standard_normal((100, 8)))
    calls, real_sqrtm = [], linalg.sqrtm
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a: (calls.append(a), np.full_like(a, np.nan)
                                                            if len(calls) == 1 else real_sqrtm(a))[1])
    with pytest.warns(UserWarning, match="singular"):
        value = frechet_distance(mu, s1, mu, s2, eps=1e-6)
    offset = np.eye(8) * 1e-6
    assert len(calls) == 2 and np.allclose(calls[1], (s1 + offset) @ (s2 + offset), rtol=0, atol=1e-15)
    # as in ADM, the offset enters the root only, not the traces
    expected = frechet_distance(mu, s1 + offset, mu, s2 + offset, method="eigh") - 2 * 8 * 1e-6
    assert value == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_refuses_large_imaginary_parts_and_mismatched_statistics():
    with pytest.raises(ValueError, match="imaginary component of 1"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ---- Inception Score ----------------------------------------------------------------------------------

def test_inception_score_of_uniform_and_one_hot_predictions():
    classes = 10
    assert inception_score(torch.zeros(1000, classes)) == pytest.approx(1.0, abs=1e-12)
    interleaved = 60.0 * F.one_hot(torch.arange(1000) % classes, classes)
    assert inception_score(interleaved) == pytest.approx(classes, rel=1e-9)
    assert inception_score(60.0 * F.one_hot(torch.zeros(1000, dtype=torch.long), classes)) == pytest.approx(1.0)
    # ADM's splits are consecutive runs of 5000: a class-sorted file sees half the classes per split
    by_class = 60.0 * F.one_hot(torch.arange(10000) // 1000, classes)
    assert inception_score(by_class) == pytest.approx(5.0, rel=1e-9)
    assert inception_score(by_class[torch.randperm(10000)]) == pytest.approx(classes, rel=1e-2)


# ---- precision / recall -------------------------------------------------------------------------------

def test_manifold_radii_are_the_kth_neighbour_distance_without_the_point_itself():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    brute = np.sort(((x[:, None] - x[None]) ** 2).sum(-1).numpy(), axis=1)[:, 3]
    for chunk in (7, 16, 4096):
        assert np.allclose(manifold_radii(x, k=3, chunk=chunk).numpy(), brute, rtol=1e-5, atol=1e-5)


def test_precision_recall_on_constructed_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 8, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0) == (0.0, 0.0)
    # half the samples copy the reference, half are far away: precision 1/2, every real point covered
    assert precision_recall(real, torch.cat([real, real + 1000.0])) == (0.5, 1.0)
    fake = torch.randn(45, 8, generator=g) + 1.0
    p, r = precision_recall(real, fake, chunk=4096)
    assert 0 < p < 1 and 0 < r < 1 and precision_recall(real, fake, chunk=7) == (p, r)


# ---- the FID Inception ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """Random weights in pytorch-fid's layout: torchvision's Inception-v3, 1008 classes, no aux head."""
    from tests.encoders import fid_inception_state
    state = fid_inception_state()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return str(path), state


@pytest.fixture(scope="module")
def inception(fid_weights):
    return load_inception(fid_weights[0])


def _images(seed, n, h=32, w=32, brightness=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 256, (n, h, w, 3)) + brightness, 0, 255).astype(np.uint8)


def test_inception_features_have_the_fid_shapes_and_meanings(inception, fid_weights):
    captured = {}
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        out = inception(torch.from_numpy(_images(0, 3, 40, 48)).permute(0, 3, 1, 2))
    finally:
        hook.remove()
    assert out.pool.shape == (3, 2048) and out.spatial.shape == (3, 2023) and out.logits.shape == (3, 1008)
    assert torch.isfinite(out.pool).all() and not torch.allclose(out.pool[0], out.pool[1])
    # sFID: mixed_6/conv, first 7 channels, in TF's (17, 17, 7) order; IS logits without the bias
    assert torch.equal(out.spatial, captured["out"][:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    assert torch.allclose(out.logits, out.pool @ fid_weights[1]["fc.weight"].T, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        inception(torch.zeros(1, 3, 8, 8))


def test_inception_matches_torchvision_patched_the_pytorch_fid_way(inception, fid_weights, monkeypatch):
    images = torch.from_numpy(_images(1, 2)).permute(0, 3, 1, 2)
    ours = inception(images)
    reference = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False,
                                                init_weights=False).eval()
    reference.load_state_dict(fid_weights[1], strict=False)
    avg_pool = F.avg_pool2d

    def tf_pool(x, kernel_size, stride=None, padding=0, **_):
        if x.shape[1] == 2048:  # the input of Mixed_7c, whose pool branch max-pools in the 2015 graph
            return F.max_pool2d(x, kernel_size, stride, padding)
        return avg_pool(x, kernel_size, stride, padding, count_include_pad=False)

    pooled = {}
    reference.avgpool.register_forward_hook(lambda m, i, o: pooled.setdefault("pool", o.flatten(1)))
    monkeypatch.setattr(torchvision.models.inception.F, "avg_pool2d", tf_pool)
    x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        logits = reference(x)
    assert torch.allclose(ours.pool, pooled["pool"], atol=1e-4)
    assert torch.allclose(ours.logits + fid_weights[1]["fc.bias"], logits, atol=1e-4)


def test_load_inception_reads_wrapped_state_dicts_and_the_environment(inception, fid_weights, tmp_path,
                                                                      monkeypatch):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in fid_weights[1].items()}}, path)
    monkeypatch.setenv("PIXELDIT_INCEPTION", str(path))
    loaded = load_inception()
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, inception.Mixed_7c.branch_pool.conv.weight)
    assert build_parser().parse_args(["evaluate", "s.npz", "--ref", "r.npz"]).inception == str(path)
    monkeypatch.delenv("PIXELDIT_INCEPTION")
    with pytest.raises(ValueError, match="PIXELDIT_INCEPTION"):
        load_inception()


def test_load_inception_names_the_file_and_the_offending_key(fid_weights, tmp_path):
    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, unknown)
    with pytest.raises(ValueError, match=f"{unknown}: unknown Inception weights layout.*encoder.weight"):
        load_inception(str(unknown))
    state = dict(fid_weights[1])
    del state["Mixed_6d.branch1x1.bn.running_var"]
    missing = tmp_path / "missing.pth"
    torch.save(state, missing)
    with pytest.raises(ValueError, match=f"{missing}: missing Inception weight Mixed_6d.branch1x1.bn.running_var"):
        load_inception(str(missing))
    state = dict(fid_weights[1], **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    imagenet = tmp_path / "imagenet.pth"
    torch.save(state, imagenet)
    with pytest.raises(ValueError, match=r"fc.weight has shape \(1000, 2048\), expected \(1008, 2048\)"):
        load_inception(str(imagenet))
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(ValueError, match=f"{text}: cannot be read"):
        load_inception(str(text))


# ---- the command -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    samples, reference = str(root / "samples.npz"), str(root / "reference.npz")
    # arr_1 sorted by class, the way `pixeldit sample` writes it
    np.savez(samples, arr_0=_images(10, 8), arr_1=np.repeat(np.arange(4), 2))
    np.savez_compressed(reference, arr_0=_images(11, 8, brightness=60))
    return {"root": root, "samples": samples, "reference": reference}


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def with_reference_images(batches, fid_weights):
    out = str(batches["root"] / "metrics.json")
    code, stdout, _ = _run(["evaluate", batches["samples"], "--ref", batches["reference"], "--inception",
                            fid_weights[0], "--batch-size", "3", "--frechet", "eigh", "--out", out])
    with open(out) as f:
        return code, stdout, json.load(f)


def test_evaluate_command_against_reference_images(with_reference_images):
    code, stdout, result = with_reference_images
    assert code == 0
    assert result["num_samples"] == 8 and result["image_size"] == [32, 32] and result["num_reference_images"] == 8
    assert result["fid"] > 0 and result["sfid"] > 0 and result["fid_reference"] == "from reference images"
    assert 1.0 <= result["inception_score"] <= 8 and result["inception_score_splits"].startswith("shuffled")
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    for line in ("Inception Score", "FID ", "sFID", "Precision", "Recall"):
        assert line in stdout
    assert f"{result['fid']:.4f}" in stdout


def test_evaluate_command_against_precomputed_statistics(batches, inception, fid_weights, with_reference_images):
    reference = extract_features(batches["reference"], inception, batch_size=4)
    mu, sigma = feature_statistics(reference.pool)
    stats_only = str(batches["root"] / "stats.npz")
    np.savez(stats_only, mu=mu, sigma=sigma)
    out = str(batches["root"] / "stats.json")
    code, stdout, _ = _run(["evaluate", batches["samples"], "--ref", stats_only, "--inception", fid_weights[0],
                            "--frechet", "eigh", "--out", out])
    with open(out) as f:
        result = json.load(f)
    assert code == 0 and result["fid_reference"] == "precomputed"
    assert result["fid"] == pytest.approx(with_reference_images[2]["fid"], rel=1e-6)
    assert result["sfid"] is None and result["precision"] is None and result["recall"] is None
    assert "n/a" in stdout
    # the training loop's in-memory path (InceptionStats summed over batches of 5 and 3) agrees
    images = torch.from_numpy(np.load(batches["samples"])["arr_0"]).permute(0, 3, 1, 2)
    assert fid_from_uint8(images, mu, sigma, inception, batch_size=5, method="eigh") == pytest.approx(
        result["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        InceptionStats(inception).compute()


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)},
     "arr_0 must be uint8 images of shape \\(N, H, W, 3\\), got float32"),
    ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, "got uint8 \\(4, 8, 8\\)"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "no arr_0 images \\(arrays: images\\)"),
])
def test_evaluate_command_refuses_a_bad_samples_file(batches, fid_weights, tmp_path, arrays, message):
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **arrays)
    code, _, stderr = _run(["evaluate", bad, "--ref", batches["reference"], "--inception", fid_weights[0]])
    assert code == 2 and f"{bad}: " in stderr and len(stderr.strip().splitlines()) == 1
    assert re.search(message, stderr)


def test_evaluate_command_refuses_bad_references_and_weights(batches, tmp_path):
    no_arrays = str(tmp_path / "ref.npz")
    np.savez(no_arrays, labels=np.arange(3))
    code, _, stderr = _run(["evaluate", batches["samples"], "--ref", no_arrays, "--inception", "unused.pth"])
    assert code == 2 and f"{no_arrays}: a reference needs arr_0 images or mu and sigma" in stderr
    half = str(tmp_path / "half.npz")
    np.savez(half, mu=np.zeros(2048))
    code, _, stderr = _run(["evaluate", batches["samples"], "--ref", half, "--inception", "unused.pth"])
    assert code == 2 and f"{half}: has mu but no sigma" in stderr
    code, _, stderr = _run(["evaluate", str(tmp_path / "absent.npz"), "--ref", half])
    assert code == 2 and "absent.npz: no such file" in stderr
    weights = tmp_path / "other.pth"
    torch.save({"backbone.0.weight": torch.zeros(2)}, weights)
    code, _, stderr = _run(["evaluate", batches["samples"], "--ref", batches["reference"], "--inception",
                            str(weights)])
    assert code == 2 and f"{weights}: unknown Inception weights layout" in stderr
