"""REPA: DINOv2 loading from Meta's layout, the feature cache, lockstep loading, online vs cached training."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from pixeldit.cli import main
from pixeldit.data_pipelines.features import decode, load_feature_manifest, mirror_grid
from pixeldit.data_pipelines.lanes import LoaderSpec
from pixeldit.data_pipelines.loader import ShardLoader
from pixeldit.data_pipelines.manifest import load_manifest
from pixeldit.data_pipelines.source import Split
from pixeldit.storage import filesystem, join, strip_protocol
from pixeldit.data_pipelines.tario import iter_samples
from pixeldit.models.dinov2 import load_dinov2, resize_pos_embed_like_meta
from pixeldit.platform.config import load_config
from tests.encoders import META_GRID, meta_state_dict, save_meta_weights
from tests.loaders import config_loader

SIZE = 32  # 32 px images: 2 x 2 PixelDiT patches, DINOv2 input 28 px = 2 x 2 tokens


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from pixeldit.data_pipelines.writer import synthetic_items, write_shards
    root = str(tmp_path_factory.mktemp("repa_images"))
    items, classes = synthetic_items(10, 5, SIZE, seed=3)
    write_shards(items, classes, root, shard_samples=16, progress=False)  # 50 samples: 16 16 16 2
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_meta_weights(tmp_path_factory.mktemp("dinov2") / "dinov2_tiny_pretrain.pth")


def cache(images, out, weights, *extra, endpoint=None):
    args = ["repa-cache", "--data", images, "--out", out, "--encoder", weights, "--image-size", str(SIZE), *extra]
    return main(args + (["--endpoint-url", endpoint] if endpoint else []))


def shard_samples(url, options=None):
    fs = filesystem(url, options)
    with fs.open(strip_protocol(url), "rb") as f:
        return list(iter_samples(f, url))


def image_batch(images, keys):
    """uint8 images of the given keys straight from the image shards."""
    from pixeldit.data_pipelines.samples import decode_image, image_bytes
    manifest = load_manifest(images)
    found = {}
    for shard in manifest.shards:
        for key, files in shard_samples(join(images, shard.name)):
            found[key] = decode_image(image_bytes(files), SIZE, False)
    return torch.stack([found[k] for k in keys])


# ---------------------------------------------------------------- the encoder

def test_meta_layout_loads_and_gives_normalised_patch_tokens(weights, tmp_path):
    encoder = load_dinov2(weights, SIZE)
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    tokens = encoder(x)
    assert tokens.shape == (3, 4, 64) and encoder.tokens == 4 and encoder.input_size == 28
    # after the final LayerNorm (unit weight, zero bias here) every token has mean 0 and std 1
    assert tokens.mean(-1).abs().max() < 1e-5
    assert (tokens.std(-1, unbiased=False) - 1).abs().max() < 1e-3
    # the same weights in timm's layout (as timm itself saves them) give the same features
    timm_path = tmp_path / "timm.pth"
    torch.save({k: v for k, v in encoder.vit.state_dict().items()}, timm_path)
    assert torch.allclose(load_dinov2(str(timm_path), SIZE)(x), tokens, atol=1e-6)
    # ViT-g names its SwiGLU w12 / w3
    giant = tmp_path / "g.pth"
    torch.save(meta_state_dict(dim=64, depth=1, swiglu=True), giant)
    assert load_dinov2(str(giant), SIZE)(x).shape == (3, 4, 64)


def test_input_is_the_clean_image_in_0_1_normalised_then_resized_bicubic(weights):
    encoder = load_dinov2(weights, SIZE)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    prepared = F.interpolate(((x + 1) / 2 - mean) / std, size=(28, 28), mode="bicubic", align_corners=False)
    expected = encoder.vit.forward_features(prepared)[:, 1:]
    assert torch.allclose(encoder(x), expected, atol=1e-6)


def test_position_embedding_is_resized_like_meta_not_like_timm():
    from timm.layers import resample_abs_pos_embed
    dim, grid = 4, 16
    # a ramp along x, resized, against cubic convolution (a = −0.75, edges clamped) evaluated by hand at
    # Meta's sample points: x_src = (i + 0.5) · 37 / (16 + 0.1) − 0.5, not timm's 37 / 16 spacing
    ramp = torch.arange(META_GRID, dtype=torch.float64).pow(1.5).repeat(META_GRID, 1)
    pos = torch.cat([torch.zeros(1, 1, dim), ramp.float().reshape(1, -1, 1).repeat(1, 1, dim)], dim=1)
    out = resize_pos_embed_like_meta(pos, grid)[0, 1:, 0].view(grid, grid)

    def cubic(d, a=-0.75):
        d = abs(d)
        return (a + 2) * d**3 - (a + 3) * d**2 + 1 if d <= 1 else (a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
                                                                    if d < 2 else 0.0)
    expected = []
    for i in range(grid):
        x = (i + 0.5) * META_GRID / (grid + 0.1) - 0.5
        base = int(torch.tensor(x).floor())
        expected.append(sum(cubic(x - k) * ramp[0, min(max(k, 0), META_GRID - 1)] for k in range(base - 1, base + 3)))
    assert torch.allclose(out, torch.tensor(expected).float().expand(grid, -1), atol=1e-3)
    timm = resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=1)[0, 1:, 0].view(grid, grid)
    assert (timm - out).abs().max() > 0.05


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_dinov2(str(tmp_path / "missing.pth"), SIZE)
    bad = tmp_path / "not_dinov2.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not_dinov2.pth.*cls_token"):
        load_dinov2(str(bad), SIZE)


# ---------------------------------------------------------------- the cache

def test_cache_mirrors_the_image_shards_and_resumes_per_shard(images, weights, tmp_path, monkeypatch):
    out = str(tmp_path / "features")
    assert cache(images, out, weights) == 0
    manifest = load_feature_manifest(out)
    image_manifest = load_manifest(images)
    assert (manifest.tokens, manifest.dim, manifest.dtype, manifest.flip) == (4, 64, "fp16", "none")
    assert manifest.input_size == 28 and len(manifest.weights_sha256) == 64
    assert [s.name for s in manifest.shards] == [s.name for s in image_manifest.shards]
    encoder = load_dinov2(weights, SIZE)
    for shard in manifest.shards:
        feats = shard_samples(join(out, shard.name))
        keys = [k for k, _ in shard_samples(join(images, shard.name))]
        assert [k for k, _ in feats] == keys
        expected = encoder(image_batch(images, keys).float() / 127.5 - 1)
        got = torch.stack([decode(files, manifest, False, "test").float() for _, files in feats])
        assert torch.allclose(got, expected, atol=2e-3, rtol=1e-3)
    assert not os.path.exists(join(out, "parts"))

    # resume: a run that stopped before the manifest, and lost one shard's record, redoes that shard only
    rerun = str(tmp_path / "rerun")
    from pixeldit.jobs import repa_cache
    monkeypatch.setattr(repa_cache, "finish_manifest", lambda *a, **k: None)  # "crash" before the manifest
    assert cache(images, rerun, weights) == 0
    monkeypatch.undo()
    first = manifest.shards[0].name
    os.remove(join(rerun, "parts", first.replace(".tar", ".json")))
    before = {s.name: os.stat(join(rerun, s.name)).st_mtime_ns for s in manifest.shards}
    assert cache(images, rerun, weights) == 0
    after = {s.name: os.stat(join(rerun, s.name)).st_mtime_ns for s in manifest.shards}
    assert after[first] != before[first]
    assert all(after[n] == before[n] for n in before if n != first)
    assert load_feature_manifest(rerun).shards == manifest.shards  # byte-identical shards (same sha256)


def test_a_resume_with_other_settings_is_refused(images, weights, tmp_path, capsys, monkeypatch):
    from pixeldit.jobs import repa_cache
    out = str(tmp_path / "f")
    monkeypatch.setattr(repa_cache, "finish_manifest", lambda *a, **k: None)
    assert cache(images, out, weights) == 0
    assert cache(images, out, weights, "--dtype", "int8") == 2
    assert "other settings (dtype)" in capsys.readouterr().err


def test_int8_bf16_and_flip_policies(images, weights, tmp_path):
    out = {d: str(tmp_path / d) for d in ("fp16", "bf16", "int8")}
    assert cache(images, out["fp16"], weights, "--flip", "both") == 0
    assert cache(images, out["bf16"], weights, "--dtype", "bf16", "--flip", "grid") == 0
    assert cache(images, out["int8"], weights, "--dtype", "int8", "--flip", "both") == 0
    manifests = {d: load_feature_manifest(out[d]) for d in out}
    assert manifests["int8"].sample_bytes() * 2 < manifests["fp16"].sample_bytes() + 4 * 4 * 2 * 2 + 1
    encoder = load_dinov2(weights, SIZE)
    shard = manifests["fp16"].shards[0].name
    keys = [k for k, _ in shard_samples(join(images, shard))]
    x = image_batch(images, keys).float() / 127.5 - 1
    plain, flipped = encoder(x), encoder(x.flip(-1))

    def read(dtype, flip):
        samples = shard_samples(join(out[dtype], shard))
        return torch.stack([decode(files, manifests[dtype], flip, "test").float() for _, files in samples])

    def cos_error(a, b):
        return (1 - F.cosine_similarity(a, b, dim=-1)).max().item()

    assert cos_error(read("fp16", False), plain) < 1e-5
    assert cos_error(read("fp16", True), flipped) < 1e-5       # both: the true flipped features
    assert cos_error(read("bf16", False), plain) < 1e-4
    assert cos_error(read("int8", False), plain) < 1e-3         # per-token scale (docs/repa_cache.md)
    assert cos_error(read("int8", True), flipped) < 1e-3
    assert torch.equal(read("bf16", True), mirror_grid_batch(read("bf16", False)))  # grid: mirrored tokens


def mirror_grid_batch(x):
    return torch.stack([mirror_grid(t) for t in x])


# ---------------------------------------------------------------- lockstep loading

def loader(images, features, decoder="pil", workers=0, hflip=False, batch=8):
    manifest = load_manifest(images)
    spec = LoaderSpec(manifest, images, SIZE, batch, 0, Split(1, 0, max(1, workers), batch), 8, hflip, None,
                      features=load_feature_manifest(features), features_root=features)
    return ShardLoader(spec, decoder, workers)


def test_both_decoders_carry_the_cached_targets_in_lockstep_and_resume(images, weights, tmp_path):
    out = str(tmp_path / "features")
    assert cache(images, out, weights, "--flip", "both") == 0
    encoder = load_dinov2(weights, SIZE)
    for decoder in ("pil", "dali"):
        batches = list(loader(images, out, decoder, workers=2, hflip=True))
        assert all(b["repa"].shape == (len(b["key"]), 4, 64) and b["repa"].dtype == torch.float16 for b in batches)
        for b in batches[:2]:  # targets are the features of the (possibly flipped) image in the batch
            assert torch.allclose(b["repa"].float(), encoder(b["image"].float() / 127.5 - 1), atol=3e-3, rtol=1e-3)
        resumed = loader(images, out, decoder, workers=2, hflip=True)
        it = iter(resumed)
        next(it)
        state = resumed.state_dict()
        fresh = loader(images, out, decoder, workers=2, hflip=True)
        fresh.load_state_dict(state)
        rest = list(fresh)
        assert [b["key"] for b in rest] == [b["key"] for b in batches[1:]]
        assert all(torch.equal(a["repa"], b["repa"]) for a, b in zip(rest, batches[1:]))


def test_features_of_other_images_or_shapes_are_refused(images, weights, tmp_path):
    out = str(tmp_path / "features")
    assert cache(images, out, weights) == 0
    manifest = load_feature_manifest(out)
    # a feature shard whose keys are not the image shard's: rewrite shard 0 with one key renamed
    from pixeldit.data_pipelines.writer import OpenShard
    name = manifest.shards[0].name
    samples = shard_samples(join(out, name))
    shard = OpenShard(out, name[:-4], None)
    for i, (key, files) in enumerate(samples):
        shard.writer.add(key + "x" if i == 3 else key, files)
    shard.finish()
    with pytest.raises(ValueError, match=f"{name}.*do not mirror"):
        list(loader(images, out))
    # a manifest claiming another width: every sample has the wrong byte count
    wide = str(tmp_path / "wide")
    assert cache(images, wide, weights) == 0
    data = json.loads(open(join(wide, "manifest.json")).read())
    data["dim"] = 32
    open(join(wide, "manifest.json"), "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="expected 256 bytes"):
        list(loader(images, wide))
    cfg = load_config(None, [f"data.source={images}", f"data.image_size={SIZE}", "model.name=pixeldit-tiny", "model.patch_size=16",
                             "repa.mode=cached", f"repa.features={out}", "repa.block=2", "repa.encoder_dim=768",
                             "train.global_batch=8", "train.micro_batch=8"])
    with pytest.raises(ValueError, match="64-wide features.*repa.encoder_dim=768"):
        config_loader(cfg, 0, 1)
    # the same shard names and keys, but another version of the image set (its manifest changed)
    import shutil
    changed = tmp_path / "changed_images"
    shutil.copytree(images, changed)
    text = (changed / "manifest.json").read_text()
    (changed / "manifest.json").write_text(text.replace('"seed": 0', '"seed": 7'))
    cfg = load_config(None, [f"data.source={changed}", f"data.image_size={SIZE}", "model.name=pixeldit-tiny",
                             "model.patch_size=16", "repa.mode=cached", f"repa.features={wide}", "repa.block=2",
                             "repa.encoder_dim=32", "train.global_batch=8", "train.micro_batch=8"])
    with pytest.raises(ValueError, match="another version of"):
        config_loader(cfg, 0, 1)


def test_cache_to_s3_and_stream_it_back(s3_endpoint, s3_bucket, images, weights, tmp_path):
    from pixeldit.data_pipelines.writer import synthetic_items, write_shards
    options = {"endpoint_url": s3_endpoint.url}
    remote_images = f"s3://{s3_bucket}/images"
    items, classes = synthetic_items(10, 5, SIZE, seed=3)
    write_shards(items, classes, remote_images, shard_samples=16, options=options, progress=False)
    remote = f"s3://{s3_bucket}/dinov2"
    assert cache(remote_images, remote, weights, endpoint=s3_endpoint.url) == 0
    local = str(tmp_path / "local")
    assert cache(images, local, weights) == 0
    assert load_feature_manifest(remote, options).shards == load_feature_manifest(local).shards
    cfg = load_config(None, [f"data.source={remote_images}", f"data.endpoint_url={s3_endpoint.url}",
                             f"data.image_size={SIZE}", "model.name=pixeldit-tiny", "model.patch_size=16", "repa.mode=cached",
                             f"repa.features={remote}", "repa.block=2", "repa.encoder_dim=64",
                             "train.global_batch=10", "train.micro_batch=10"])
    batch = next(iter(config_loader(cfg, 0, 1)))
    assert batch["repa"].shape == (10, 4, 64)


# ---------------------------------------------------------------- training

def trainer_config(images, run_mode, weights, features=None, *extra):
    return load_config(None, [f"data.source={images}", f"data.image_size={SIZE}", "model.name=pixeldit-tiny", "model.patch_size=16",
                              f"repa.mode={run_mode}", f"repa.encoder={weights}", "repa.encoder_dim=64",
                              "repa.block=2", "train.global_batch=10", "train.micro_batch=5", "train.steps=2",
                              "logging.every_steps=1", "checkpoint.every_steps=100", "logging.sample_every_steps=0",
                              *([f"repa.features={features}"] if features else []), *extra])


def test_online_and_cached_targets_give_the_same_repa_loss(images, weights, tmp_path):
    from pixeldit.platform.trainer import Trainer
    features = str(tmp_path / "features")
    assert cache(images, features, weights) == 0
    online = Trainer(trainer_config(images, "online", weights), str(tmp_path / "online"))
    cached = Trainer(trainer_config(images, "cached", weights, features), str(tmp_path / "cached"))
    batch_online, batch_cached = next(iter(online.loader)), next(iter(cached.loader))
    assert batch_online["key"] == batch_cached["key"]
    a, b = online.train_step(batch_online), cached.train_step(batch_cached)
    assert 0.05 < a["loss_repa"] < 2.0
    assert abs(a["loss_repa"] - b["loss_repa"]) < 1e-4 * a["loss_repa"]  # fp16 storage of the targets
    assert abs(a["loss"] - b["loss"]) < 1e-6 * a["loss"]
    # the projector trains with the model and is exported with it
    state = cached.fit()
    assert state.step == 2
    from tests.test_trainer import scalars
    acc = scalars(str(tmp_path / "cached"))
    assert [e.step for e in acc.Scalars("train/loss_repa")] == [2]  # the step above counted as step 1
    from pixeldit.platform.export import export_checkpoint
    from safetensors import safe_open
    export_checkpoint(str(tmp_path / "cached"), str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.get_tensor("projector.4.weight").shape[0] == 64  # D -> C_enc


def test_repa_weight_zero_leaves_the_diffusion_training_alone(images, weights, tmp_path):
    from pixeldit.platform.trainer import Trainer
    off = Trainer(trainer_config(images, "off", weights), str(tmp_path / "off")).fit()
    zero = Trainer(trainer_config(images, "online", weights, None, "repa.weight=0"), str(tmp_path / "zero")).fit()
    assert list(off.history) == list(zero.history)


def _cache_and_train(rank, world, images, weights, root):
    import torch.distributed as dist

    from pixeldit.jobs.repa_cache import cache_features
    from pixeldit.platform.trainer import Trainer
    cache_features(images, os.path.join(root, "features"), load_dinov2(weights, SIZE), rank=rank, world=world,
                   batch_size=7, progress=False)
    dist.barrier()
    losses = {}
    for strategy in ("ddp", "fsdp", "zero2"):
        cfg = trainer_config(images, "cached", weights, os.path.join(root, "features"), "train.steps=3",
                             f"distributed.strategy={strategy}", "logging.tensorboard=false")
        losses[strategy] = list(Trainer(cfg, os.path.join(root, strategy)).fit().history)
    return losses


def test_two_ranks_split_the_cache_job_and_train_with_the_projector_sharded(images, weights, tmp_path):
    from tests.dist import run_distributed
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))
    root = str(tmp_path / "two")
    results = run_distributed(_cache_and_train, 2, images, weights, root, timeout=300)
    single = str(tmp_path / "one")
    assert cache(images, single, weights) == 0
    assert load_feature_manifest(os.path.join(root, "features")).shards == load_feature_manifest(single).shards
    reference = results[0]["ddp"]  # the same world size: the epoch plan, hence each step's samples, match
    for strategy in ("fsdp", "zero2"):
        assert results[0][strategy] == results[1][strategy]
        for a, b in zip(results[0][strategy], reference):
            assert abs(a - b) <= 1e-5 * abs(b), (strategy, results[0][strategy], reference)
