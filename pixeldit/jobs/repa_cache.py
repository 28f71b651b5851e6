"""`pixeldit repa-cache --data URL --out URL`: DINOv2 targets for every image, as mirror shards.

Image shard i → feature shard i with the same name, keys and order, so the loader reads both
with one plan. Ranks (under torchrun) take shards i ≡ rank (mod world); finished shards are
recorded and skipped by a rerun, and rank 0 writes the manifest when every shard is recorded
(data_pipelines/feature_cache.py).
"""

from __future__ import annotations

import concurrent.futures
import os

import torch
import torch.distributed as dist

from ..data_pipelines.feature_cache import decode_sample, finish_manifest, recorded, tokens_to_files, write_record
from ..data_pipelines.features import DTYPES, FLIPS, FeatureManifest
from ..data_pipelines.lanes import batched
from ..data_pipelines.manifest import Manifest, read_manifest
from ..data_pipelines.source import ShardReader
from ..data_pipelines.writer import OpenShard
from ..errors import ConfigError
from ..models.dinov2 import DinoV2Encoder
from ..storage import protocol_of, strip_protocol


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
    if protocol_of(out) == "file":
        os.makedirs(strip_protocol(out), exist_ok=True)
    mine = [i for i in range(len(images.shards)) if i % world == rank]
    todo = [i for i in mine if not recorded(out, images.shards[i].name, settings, options)]
    bar = tqdm(total=sum(images.shards[i].samples for i in todo), unit="img", disable=not progress or rank != 0,
               desc=f"repa-cache ({world} rank{'s' if world > 1 else ''})")
    reader = ShardReader(images, data, options)
    with concurrent.futures.ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") as pool:
        for i in todo:
            shard = images.shards[i]
            info, unreadable = _cache_shard(reader, i, images, out, encoder, pool, dtype, flip, batch_size, options,
                                            bar.update)
            write_record(out, shard.name, settings, info, unreadable, options)
    bar.close()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    facts = {"encoder": encoder.name, "weights": encoder.weights, "weights_sha256": encoder.digest,
             "image_size": encoder.image_size, "input_size": encoder.input_size, "tokens": encoder.tokens,
             "dim": encoder.dim}
    return finish_manifest(out, images, facts, settings, options)


def _cache_shard(reader: ShardReader, i: int, images: Manifest, out: str, encoder: DinoV2Encoder, pool, dtype: str,
                 flip: str, batch_size: int, options, advance) -> tuple:
    """Feature shard i, written whole or not at all; its info and the keys whose image did not decode."""
    shard = images.shards[i]
    crop = not (images.image.mode == "adm" and images.image.size == encoder.image_size)
    device = next(encoder.parameters()).device
    sink = OpenShard(out, shard.name.rsplit(".", 1)[0], options)
    unreadable = []
    try:
        for chunk in batched(reader.read_run(i, 0, shard.samples), batch_size):
            decoded = list(pool.map(lambda item: decode_sample(item, encoder.image_size, crop), chunk))
            unreadable += [key for (_, key, _), image in zip(chunk, decoded) if image is None]
            for (_, key, _), tokens in zip(chunk, _encode_batch(encoder, decoded, flip, device)):
                sink.writer.add(key, tokens_to_files(tokens, dtype, flip))
            advance(len(chunk))
        return sink.finish(), unreadable
    except BaseException:
        sink.abort()
        raise


@torch.no_grad()
def _encode_batch(encoder: DinoV2Encoder, decoded: list, flip: str, device) -> list[tuple]:
    size = encoder.image_size
    present = torch.stack([d if d is not None else torch.zeros(3, size, size, dtype=torch.uint8) for d in decoded])
    x = present.to(device).float() / 127.5 - 1.0
    feats = encoder(x).cpu()
    flipped = encoder(x.flip(-1)).cpu() if flip == "both" else [None] * len(decoded)
    return [(torch.zeros_like(f), None) if d is None else (f, g) for d, f, g in zip(decoded, feats, flipped)]


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
