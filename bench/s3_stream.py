"""Streaming shards from S3 (moto's server on loopback): our sample source vs a plain s3fs read.

    python bench/s3_stream.py --images 600 --repeat 3

Both read the same shard bytes from the same endpoint; ours also plans the epoch, parses the
tars, splits lanes and shuffles windows, but does not decode (decoding is measured by
bench/data_throughput.py). The server shares the machine's cores, so both sides pay for it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lanes", type=int, default=2)
    args = parser.parse_args()

    import boto3
    import s3fs

    from pixeldit.data_pipelines.lanes import LoaderSpec, rank_groups
    from pixeldit.data_pipelines.manifest import ImagePolicy, load_manifest
    from pixeldit.data_pipelines.source import Split
    from pixeldit.data_pipelines.writer import list_image_folder, write_shards
    from tests.photos import make_photo_folder
    from tests.s3_server import moto_server

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint.url).create_bucket(Bucket="bench")
        src = tempfile.mkdtemp()
        from pathlib import Path
        make_photo_folder(Path(src), classes=4, per_class=args.images // 4, with_bad=False)
        items, classes = list_image_folder(src)
        url = "s3://bench/crop256"
        options = {"endpoint_url": endpoint.url}
        write_shards(items, classes, url, policy=ImagePolicy("adm", 256, "jpg", 95), shard_samples=100,
                     options=options, progress=False)
        manifest = load_manifest(url, options)
        total = sum(s.bytes for s in manifest.shards)

        def plain():
            fs = s3fs.S3FileSystem(endpoint_url=endpoint.url, skip_instance_cache=True)
            return sum(len(fs.cat_file(f"bench/crop256/{s.name}")) for s in manifest.shards)

        def ours():
            spec = LoaderSpec(manifest, url, 256, 20, 0, Split(1, 0, args.lanes, 20), 512, False, options)
            return sum(len(g) for g, _ in rank_groups(spec, 0, 0))

        rows = {"plain s3fs cat": [], "ours (plan + stream + parse)": []}
        for _ in range(args.repeat):
            for name, fn in (("plain s3fs cat", plain), ("ours (plan + stream + parse)", ours)):
                start = time.perf_counter()
                fn()
                rows[name].append(time.perf_counter() - start)
        base = statistics.median(rows["plain s3fs cat"])
        print(f"\n{manifest.num_samples} samples, {total / 2**20:.1f} MiB in {len(manifest.shards)} shards, "
              f"median of {args.repeat}")
        for name, times in rows.items():
            t = statistics.median(times)
            print(f"{name:32s} {t:6.2f} s  {total / 2**20 / t:7.1f} MiB/s  {t / base:5.2f}x plain")


if __name__ == "__main__":
    main()
