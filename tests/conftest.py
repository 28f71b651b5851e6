import os

import pytest

from tests.s3_server import faulty_s3, s3_bucket, s3_endpoint  # noqa: F401 - moto and the fault proxy, for every test

# two-core CI machine: keep torch from oversubscribing when pytest runs subprocesses
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory):
    """Shards written from real photographs (incl. CMYK, gray, palette, RGBA and two corrupt files)."""
    from pixeldit.data_pipelines.writer import list_image_folder, write_shards
    from tests.photos import make_photo_folder

    root = tmp_path_factory.mktemp("photos")
    made = make_photo_folder(root / "src")
    items, classes = list_image_folder(str(root / "src"))
    write_shards(items, classes, str(root / "shards"), shard_samples=7, seed=1, source=str(root / "src"),
                 progress=False)
    return {"root": str(root / "shards"), "src": root / "src", "made": made}


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    from pixeldit.data_pipelines.writer import synthetic_items, write_shards

    root = str(tmp_path_factory.mktemp("synthetic"))
    items, classes = synthetic_items(10, 23, 16, seed=0)  # 230 samples: remainders are not round
    write_shards(items, classes, root, shard_samples=40, progress=False)
    return root

