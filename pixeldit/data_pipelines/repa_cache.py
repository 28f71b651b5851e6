"""`pixeldit repa-cache --data URL --out URL`: DINOv2 targets for every image, as mirror shards.

Image shard i → feature shard i with the same name, keys and order, so the
loader reads both with one plan. Ranks (under torchrun) take shards i ≡ rank
(mod world). A finished shard leaves a record under `<out>/parts/`; a rerun
skips recorded shards (resume per shard) and refuses records written with
other settings. When every shard is recorded, rank 0 writes the manifest.
An image that does not decode gets zero features and is listed in the
manifest (the loader skips that image anyway, so they are never used).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..errors import ConfigError, DataError
from ..models.dinov2 import DinoV2Encoder
from .features import DTYPES, FLIPS, FeatureManifest, encode, save_feature_manifest
from .loader import batched, decode_image, image_bytes
from .manifest import ShardInfo, read_manifest
from .source import ShardReader
from ..storage import exists, filesystem, join, protocol_of, read_bytes, strip_protocol, write_bytes
from .writer import OpenShard

log = logging.getLogger(__name__)
PARTS = "parts"


def _record_url(out: str, shard_name: str) -> str:
    return join(out, PARTS, shard_name.rsplit(".", 1)[0] + ".json")


def cache_features(data: str, out: str, encoder: DinoV2Encoder, *, dtype: str = "fp16", flip: str = "none",
                   batch_size: int = 64, rank: int = 0, world: int = 1, options: dict | None = None,
                   decode_threads: int = 4, progress: bool = True) -> FeatureManifest | None:
    """Write this rank's feature shards; rank 0 returns the manifest once every shard is done."""
    from tqdm import tqdm

    if dtype not in DTYPES or flip not in FLIPS:
        raise ConfigError(f"dtype={dtype!r} / flip={flip!r}: expected one of {DTYPES} / {FLIPS}")
    images, images_sha256 = read_manifest(data, options)
    settings = {"encoder": encoder.name, "weights_sha256": encoder.digest, "image_size": encoder.image_size,
                "dtype": dtype, "flip": flip, "images_sha256": images_sha256}
    reader = ShardReader(images, data, options)
    crop = not (images.image.mode == "adm" and images.image.size == encoder.image_size)
    device = next(encoder.parameters()).device
    if protocol_of(out) == "file":
        os.makedirs(strip_protocol(out), exist_ok=True)
    mine = [i for i in range(len(images.shards)) if i % world == rank]
    todo = [i for i in mine if not _recorded(out, images.shards[i].name, settings, options)]
    bar = tqdm(total=sum(images.shards[i].samples for i in todo), unit="img", disable=not progress or rank != 0,
               desc=f"repa-cache ({world} rank{'s' if world > 1 else ''})")
    with concurrent.futures.ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") as pool:
        for i in todo:
            shard = images.shards[i]
            sink = OpenShard(out, shard.name.rsplit(".", 1)[0], options)
            unreadable = []
            try:
                for chunk in batched(reader.read_run(i, 0, shard.samples), batch_size):
                    decoded = list(pool.map(lambda item: _decode(item, encoder.image_size, crop), chunk))
                    unreadable += [key for (_, key, _), image in zip(chunk, decoded) if image is None]
                    for (_, key, _), tokens in zip(chunk, _encode_batch(encoder, decoded, flip, device)):
                        sink.writer.add(key, tokens_to_files(tokens, dtype, flip))
                    bar.update(len(chunk))
                info = sink.finish()
            except BaseException:
                sink.abort()
                raise
            record = {"settings": settings, "shard": asdict(info), "unreadable": unreadable}
            write_bytes(_record_url(out, shard.name), json.dumps(record).encode(), options)
    bar.close()
    if dist.is_initialized():
        dist.barrier()
    return _finish(out, images, encoder, settings, options) if rank == 0 else None


def _decode(item, size: int, crop: bool) -> torch.Tensor | None:
    _, key, files = item
    try:
        data = image_bytes(files)
        if data is None:
            raise DataError(f"no image among {sorted(files)}")
        return decode_image(data, size, crop)
    except Exception as e:  # noqa: BLE001 - the sample keeps its slot with zero features
        log.warning("sample %r does not decode (%s: %s); its features are zeros", key, type(e).__name__, e)
        return None


@torch.no_grad()
def _encode_batch(encoder: DinoV2Encoder, decoded: list, flip: str, device) -> list[tuple]:
    size = encoder.image_size
    present = torch.stack([d if d is not None else torch.zeros(3, size, size, dtype=torch.uint8) for d in decoded])
    x = present.to(device).float() / 127.5 - 1.0
    feats = encoder(x).cpu()
    flipped = encoder(x.flip(-1)).cpu() if flip == "both" else [None] * len(decoded)
    return [(torch.zeros_like(f), None) if d is None else (f, g) for d, f, g in zip(decoded, feats, flipped)]


def tokens_to_files(tokens: tuple, dtype: str, flip: str) -> dict[str, bytes]:
    plain, mirrored = tokens
    files = encode(plain, dtype)
    if flip == "both":
        files |= encode(plain if mirrored is None else mirrored, dtype, suffix="_flip")
    return files


def _recorded(out: str, shard_name: str, settings: dict, options) -> bool:
    url = _record_url(out, shard_name)
    if not exists(url, options):
        return False
    record = json.loads(read_bytes(url, options))
    if record["settings"] != settings:
        changed = sorted(k for k in settings if record["settings"].get(k) != settings[k])
        raise DataError(f"{url}: written with other settings ({', '.join(changed)}); use the same ones to "
                         f"resume, or write to another --out")
    return True


def _finish(out: str, images, encoder: DinoV2Encoder, settings: dict, options) -> FeatureManifest | None:
    shards, unreadable = [], []
    for shard in images.shards:
        url = _record_url(out, shard.name)
        if not exists(url, options):
            log.warning("%s is not finished yet; the manifest is written when every shard is", shard.name)
            return None
        record = json.loads(read_bytes(url, options))
        shards.append(ShardInfo(**record["shard"]))
        unreadable += record["unreadable"]
    manifest = FeatureManifest(shards=shards, encoder=encoder.name, weights=encoder.weights,
                               weights_sha256=encoder.digest, image_size=encoder.image_size,
                               input_size=encoder.input_size, tokens=encoder.tokens, dim=encoder.dim,
                               dtype=settings["dtype"], flip=settings["flip"],
                               images_sha256=settings["images_sha256"], unreadable=unreadable)
    save_feature_manifest(out, manifest, options)
    fs = filesystem(out, options)
    fs.rm(strip_protocol(join(out, PARTS)), recursive=True)
    return manifest


def run_repa_cache_command(args) -> int:
    from ..distributed import join_process_group
    from ..models.dinov2 import load_dinov2

    cuda = torch.cuda.is_available()
    # a long timeout: ranks with more or bigger shards reach the final barrier later
    rank, world, local_rank, started = join_process_group(cuda, timeout_s=2 * 3600)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    # bf16 on GPUs (as in training's online mode); fp32 on CPU, where bf16 matmuls are emulated
    encoder = load_dinov2(args.encoder, args.image_size, device, torch.bfloat16 if cuda else torch.float32)
    manifest = cache_features(args.data, args.out, encoder, dtype=args.dtype, flip=args.flip,
                              batch_size=args.batch_size, rank=rank, world=world, options=options,
                              decode_threads=args.threads)
    if manifest is not None:
        total = manifest.num_samples * manifest.sample_bytes()
        print(f"{args.out}: {manifest.num_samples} samples, {manifest.tokens} x {manifest.dim} {manifest.dtype} "
              f"(flip {manifest.flip}), {manifest.sample_bytes() / 1024:.0f} KiB/image, {total / 2**30:.2f} GiB; "
              f"{len(manifest.unreadable)} unreadable images")
    if started:
        dist.destroy_process_group()
    return 0
