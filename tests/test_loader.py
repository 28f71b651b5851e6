import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from pixeldit.data_pipelines.lanes import LoaderSpec
from pixeldit.data_pipelines.loader import BatchBuffers, ShardLoader, to_model_input
from pixeldit.data_pipelines.manifest import load_manifest
from pixeldit.data_pipelines.source import EpochPlan, Split
from pixeldit.platform.config import load_config
from tests.loaders import config_loader


def spec_for(root, *, batch=8, world=1, rank=0, lanes=1, window=16, seed=0, hflip=False, size=16):
    manifest = load_manifest(root)
    return LoaderSpec(manifest, root, size, batch, seed, Split(world, rank, lanes, batch), window, hflip, None)


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


def test_an_epoch_keeps_whole_global_batches_and_rotates_the_remainder(synthetic_shards):
    n = load_manifest(synthetic_shards).num_samples  # 230
    world, batch = 3, 8
    seen_dropped = set()
    for epoch in range(3):
        per_rank = []
        for rank in range(world):
            loader = ShardLoader(spec_for(synthetic_shards, batch=batch, world=world, rank=rank))
            loader.epoch = epoch
            per_rank.append([b["index"].tolist() for b in loader])
        assert len({len(b) for b in per_rank}) == 1  # every rank the same number of batches
        kept = [i for batches in per_rank for b in batches for i in b]
        assert len(kept) == n // (world * batch) * world * batch == len(set(kept))
        dropped = EpochPlan(load_manifest(synthetic_shards), 0, epoch, Split(world, 0, 1, batch)).dropped().tolist()
        assert sorted(kept + dropped) == list(range(n))  # kept plus dropped: every sample exactly once
        assert not seen_dropped & set(dropped)  # the remainder rotates
        seen_dropped |= set(dropped)


def test_epochs_are_reshuffled_and_reproducible(synthetic_shards):
    loader = ShardLoader(spec_for(synthetic_shards))
    first, second = keys_of(loader), keys_of(loader)
    assert loader.epoch == 2
    assert first != second and sorted(first) != sorted(second) or first != second
    again = ShardLoader(spec_for(synthetic_shards))
    assert keys_of(again) == first
    other_seed = ShardLoader(spec_for(synthetic_shards, seed=1))
    assert keys_of(other_seed) != first


def test_workers_give_the_batches_of_in_process_lanes(synthetic_shards):
    spec = spec_for(synthetic_shards, lanes=3, hflip=True)
    in_process, workers = list(ShardLoader(spec, num_workers=0)), list(ShardLoader(spec, num_workers=3))
    assert keys_of(workers) == keys_of(in_process)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
               for a, b in zip(workers, in_process, strict=True))
    # more lanes than batches for some lane counts: nobody fails, nothing is lost
    many = ShardLoader(spec_for(synthetic_shards, batch=32, lanes=8), num_workers=0)
    assert len(keys_of(many)) == 230 // 32 * 32


def test_batch_memory_is_reused_only_once_no_tensor_refers_to_it():
    buffers = BatchBuffers()
    first = buffers.take((2, 4, 4, 3))
    address = first.data_ptr()
    view = first[1:].permute(0, 3, 1, 2)  # what a consumer keeps of a batch: a view
    del first
    second = buffers.take((2, 4, 4, 3))
    assert second.data_ptr() != address
    del view, second
    assert buffers.take((2, 4, 4, 3)).data_ptr() == address
    assert buffers.take((3, 4, 4, 3)).shape == (3, 4, 4, 3)  # another shape: its own memory


def test_kept_batches_keep_their_pixels_while_the_lanes_run_on(synthetic_shards):
    spec = spec_for(synthetic_shards, lanes=2)
    kept = [b["image"] for b in ShardLoader(spec, num_workers=2)]  # every batch held: nothing recycled
    once_each = [b["image"].clone() for b in ShardLoader(spec, num_workers=2)]  # dropped at once: recycled
    assert len(kept) > 2 * 8  # more batches than any lane's pool keeps
    assert all(torch.equal(a, b) for a, b in zip(kept, once_each, strict=True))


def test_lane_threads_end_when_the_consumer_stops_early(synthetic_shards):
    from pixeldit.data_pipelines.loader import THREADS_PER_PROCESS
    before = threading.active_count()
    loader = ShardLoader(spec_for(synthetic_shards, lanes=3), num_workers=3, prefetch=1)
    batches = iter(loader)
    next(batches)
    assert threading.active_count() == before + 3 * THREADS_PER_PROCESS  # all started with the epoch
    batches.close()
    deadline = time.monotonic() + 20
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
    loader.close()


def process_ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] in "ZX"  # a zombie has ended too
    except FileNotFoundError:
        return True


def test_decode_processes_last_across_epochs_and_end_with_the_loader(synthetic_shards):
    loader = ShardLoader(spec_for(synthetic_shards, lanes=2), num_workers=2)
    first = keys_of(loader)
    pids = loader.processes.pids()
    assert len(pids) == 2 and len(first) == 230 // 8 * 8
    assert len(keys_of(loader)) == len(first) and loader.processes.pids() == pids  # epoch 2: same processes
    loader.close()
    assert all(process_ended(pid) for pid in pids)
    again = ShardLoader(spec_for(synthetic_shards, lanes=2), num_workers=2)
    next(iter(again))
    pids = again.processes.pids()
    del again  # garbage: the processes go with it
    import gc
    gc.collect()
    deadline = time.monotonic() + 10
    while not all(process_ended(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(process_ended(pid) for pid in pids)


def test_a_killed_decode_process_is_named_and_a_resume_replaces_it(synthetic_shards):
    import os
    import signal
    spec = spec_for(synthetic_shards, lanes=2)
    full = keys_of(ShardLoader(spec, num_workers=0))
    loader = ShardLoader(spec, num_workers=2, prefetch=1)
    batches = iter(loader)
    head = [next(batches) for _ in range(3)]
    state = loader.state_dict()
    victim = loader.processes.pids()[0]
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=rf"pil decode process {victim} ended \(exit code -9\)"):
        for _ in batches:
            pass
    loader.load_state_dict(state)
    tail = list(loader)  # the dead process is replaced when the next epoch (here: the resume) starts
    assert victim not in loader.processes.pids()
    assert keys_of(head + tail) == full
    loader.close()


def test_decode_processes_outlive_a_sigterm_the_trainer_handles(synthetic_shards):
    """SLURM signals every process of a job step; the trainer needs batches to reach its checkpoint."""
    import os
    import signal
    spec = spec_for(synthetic_shards, lanes=2)
    loader = ShardLoader(spec, num_workers=2)
    batches = iter(loader)
    head = [next(batches)]
    for pid in loader.processes.pids():
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    assert keys_of(head + list(batches)) == keys_of(ShardLoader(spec, num_workers=0))
    assert not any(process_ended(pid) for pid in loader.processes.pids())
    loader.close()


def test_a_script_without_a_main_guard_can_use_decode_processes(synthetic_shards, tmp_path):
    """multiprocessing's spawn would re-run this script in every decode process and fail."""
    import subprocess
    import sys
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pixeldit.data_pipelines.loader import LoaderSpec, ShardLoader\n"
        "from pixeldit.data_pipelines.manifest import load_manifest\n"
        "from pixeldit.data_pipelines.source import Split\n"
        f"spec = LoaderSpec(load_manifest({synthetic_shards!r}), {synthetic_shards!r}, 16, 8, 0, Split(1, 0, 2, 8), "
        "16, False, None)\n"
        "print(sum(len(b['key']) for b in ShardLoader(spec, num_workers=2)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(230 // 8 * 8)


def test_a_batch_larger_than_the_inbox_grows_it_and_decodes_the_same(photo_shards):
    """Encoded bytes travel through a shared inbox; one that is too small is replaced, and the
    process drops its mapping of the old one."""
    import numpy as np

    from pixeldit.data_pipelines import images
    from pixeldit.data_pipelines.decode_processes import DecodeProcess, shared_array
    from pixeldit.data_pipelines.source import ShardReader

    manifest = load_manifest(photo_shards["root"])
    from pixeldit.data_pipelines.samples import image_bytes
    reader = ShardReader(manifest, photo_shards["root"])
    datas = [bytes(image_bytes(files)) for _, _, files in reader.read_run(0, 0, manifest.shards[0].samples)][:6]
    out, segment = shared_array((len(datas), 64, 64, 3))
    expected = np.empty_like(out)
    assert images.decode_batch(datas, expected, True, [False] * len(datas)) == {}

    def shared_mappings(pid: int) -> int:
        with open(f"/proc/{pid}/maps") as f:
            return sum("memfd:pixeldit-batch" in line for line in f)

    process = DecodeProcess()
    try:
        inbox = process.take_inbox()
        assert process.decode(inbox, datas[:1], segment, out.shape, True, [False]) == {}
        small = inbox.segment.id
        assert shared_mappings(process.process.pid) == 2  # the inbox and the batch
        inbox.array = inbox.array[: len(datas[0])]  # pretend it holds exactly one image
        broken = datas[:2] + [b"not an image"] + datas[2:]
        failures = process.decode(inbox, broken, segment, out.shape, True, [False] * len(broken))
        assert inbox.segment.id != small and small not in process.mapped
        assert shared_mappings(process.process.pid) == 2  # the old inbox was dropped
        assert list(failures) == [2] and failures[2].startswith("UnidentifiedImageError")
        assert np.array_equal(out[: len(datas)], expected)
    finally:
        process.close()


def test_a_decode_process_imports_the_loaders_own_package_whatever_the_working_directory_holds(
        photo_shards, tmp_path, monkeypatch):
    """`python -c` puts the working directory first on the path: another checkout of pixeldit there
    (a repository's root, a bench's worktree) must not be what the process imports."""
    import numpy as np

    from pixeldit.data_pipelines.decode_processes import DecodeProcess, shared_array
    from pixeldit.data_pipelines.samples import image_bytes
    from pixeldit.data_pipelines.source import ShardReader

    manifest = load_manifest(photo_shards["root"])
    _, _, files = next(iter(ShardReader(manifest, photo_shards["root"]).read_run(0, 0, 1)))
    Path(tmp_path, "pixeldit").mkdir()
    Path(tmp_path, "pixeldit", "__init__.py").write_text("raise ImportError('another checkout')\n")
    monkeypatch.chdir(tmp_path)
    out, segment = shared_array((1, 64, 64, 3))
    process = DecodeProcess()
    try:
        inbox = process.take_inbox()
        assert process.decode(inbox, [bytes(image_bytes(files))], segment, out.shape, True, [False]) == {}
        assert np.any(out)
    finally:
        process.close()


def test_shared_batch_arrays_sit_where_the_decoder_writes_fastest():
    """16 bytes past a 64-byte boundary, like malloc's blocks (docs/benchmarks.md: 4-13% of a
    256² decode); the process-vs-in-process pixel tests catch a process that writes elsewhere."""
    from pixeldit.data_pipelines.decode_processes import ARRAY_OFFSET, shared_array
    array, _ = shared_array((2, 8, 8, 3))
    assert ARRAY_OFFSET % 64 == 16 and array.ctypes.data % 64 == ARRAY_OFFSET % 64
    assert array[1].ctypes.data % 64 == array.ctypes.data % 64  # 8² or 256² RGB slots are 64-byte multiples


def test_closing_the_loader_mid_epoch_ends_its_processes_and_the_next_iteration_resumes(synthetic_shards):
    spec = spec_for(synthetic_shards, lanes=2)
    full = keys_of(ShardLoader(spec, num_workers=0))
    loader = ShardLoader(spec, num_workers=2)
    batches = iter(loader)
    head = [next(batches)]  # the other threads are reading and decoding ahead
    pids = loader.processes.pids()
    loader.close()
    assert all(process_ended(pid) for pid in pids)
    batches.close()  # its threads got errors from the closed processes, and end
    rest = list(loader)  # continues after the batch delivered, with new processes
    assert keys_of(head + rest) == full and not set(pids) & set(loader.processes.pids())
    loader.close()


def test_lanes_stream_at_the_same_time(synthetic_shards, monkeypatch):
    from pixeldit.data_pipelines import source
    meet = threading.Barrier(2, timeout=20)
    real_read_run = source.ShardReader.read_run

    def read_run(self, *args):
        if not getattr(self, "met", False):  # each lane's first read waits for the other lane's
            self.met = True
            meet.wait()
        yield from real_read_run(self, *args)

    spec = spec_for(synthetic_shards, lanes=2)
    expected = keys_of(ShardLoader(spec, num_workers=0))
    monkeypatch.setattr(source.ShardReader, "read_run", read_run)
    assert keys_of(ShardLoader(spec, num_workers=2)) == expected


@pytest.mark.parametrize("decoder, workers", [("pil", 2), ("dali", 2), ("pil", 0)])
def test_resume_mid_epoch_continues_the_same_sequence(synthetic_shards, decoder, workers):
    spec = spec_for(synthetic_shards, lanes=max(1, workers), hflip=True)
    full = list(ShardLoader(spec, decoder, workers))
    for stop in (1, 5, 12):
        loader = ShardLoader(spec, decoder, workers)
        it = iter(loader)
        head = [next(it) for _ in range(stop)]
        state = loader.state_dict()
        del it
        resumed = ShardLoader(spec, decoder, workers)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert keys_of(head + tail) == keys_of(full)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(head + tail, full))
        assert resumed.epoch == 1 and resumed.batches_done == 0


def test_pil_and_dali_agree_on_lossless_and_jpeg_shards(synthetic_shards, photo_shards):
    for root, size, tolerance in ((synthetic_shards, 16, 0), (photo_shards["root"], 64, None)):
        spec = spec_for(root, batch=4, lanes=2, size=size, hflip=True)
        pil, dali = list(ShardLoader(spec, "pil")), list(ShardLoader(spec, "dali"))
        assert keys_of(pil) == keys_of(dali)
        assert all(torch.equal(a["label"], b["label"]) for a, b in zip(pil, dali))
        diffs = [(a["image"].int() - b["image"].int()).abs() for a, b in zip(pil, dali)]
        if tolerance == 0:
            assert all(d.max() == 0 for d in diffs)
        else:
            # original-size JPEGs: PIL does ADM's box halving + bicubic, DALI one antialiased bicubic
            # pass onto the same grid; measured mean |diff| 1.85 grey levels (docs/data.md)
            mean = torch.cat([d.flatten() for d in diffs]).float().mean().item()
            assert mean < 3.0, mean


def test_hflip_mirrors_about_half_the_images_the_same_way_for_both_decoders(synthetic_shards):
    plain = list(ShardLoader(spec_for(synthetic_shards)))
    flipped = list(ShardLoader(spec_for(synthetic_shards, hflip=True)))
    mirrored = same = 0
    for a, b in zip(plain, flipped):
        for x, y in zip(a["image"], b["image"]):
            if torch.equal(x, y):
                same += 1
            else:
                assert torch.equal(x.flip(-1), y)
                mirrored += 1
    assert 0.35 < mirrored / (mirrored + same) < 0.65


def corrupt_copy(src, dst, *, corrupt_sample=None, truncate=None, corrupt_samples=()):
    shutil.copytree(src, dst)
    m = load_manifest(str(dst))
    shard = Path(dst, m.shards[1].name)
    data = bytearray(shard.read_bytes())
    from pixeldit.data_pipelines.tario import parse_index
    entries = parse_index(Path(dst, m.shards[1].index).read_text(), "idx")
    for sample in [corrupt_sample] if corrupt_sample is not None else corrupt_samples:
        offset = entries[sample][0] + 512
        data[offset + 40: offset + 400] = b"\x00" * 360  # inside the PNG stream: breaks its CRC / zlib data
    if truncate is not None:
        data = data[:truncate]
    shard.write_bytes(bytes(data))
    return str(dst)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_skipped_and_counted_by_pil_and_dali(synthetic_shards, tmp_path, workers):
    # bad images in several batches, all of them in the epoch (not in its dropped remainder)
    clean = list(ShardLoader(spec_for(synthetic_shards)))
    first = load_manifest(synthetic_shards).shards[0].samples
    in_epoch = {i for b in clean for i in b["index"].tolist()}
    members = [m for m in (1, 3, 12, 20, 29, 37) if first + m in in_epoch][:4]
    bad = {first + m for m in members}
    assert len(bad) >= 3 and len({b_i for b_i, b in enumerate(clean) if bad & set(b["index"].tolist())}) >= 2
    root = corrupt_copy(synthetic_shards, tmp_path / "bad", corrupt_samples=members)
    loader = ShardLoader(spec_for(root, lanes=max(1, workers)), num_workers=workers)
    batches = list(loader)
    if workers:  # the images after a skipped one move up a slot, in the decode processes too
        reference = list(ShardLoader(spec_for(root, lanes=workers), num_workers=0))
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, reference, strict=True))
    expected = [[k for k, i in zip(b["key"], b["index"].tolist()) if i not in bad] for b in clean]
    if not workers:  # lanes differ with workers: the same samples, another order
        assert [b["key"] for b in batches] == expected
    assert sorted(keys_of(batches)) == sorted(k for keys in expected for k in keys)
    assert loader.stats.skipped == {"undecodable": len(bad)}
    assert all(b["image"].shape[0] == len(b["key"]) == len(b["label"]) for b in batches)
    if not workers:  # DALI fails each such batch; it is decoded on the CPU without the bad image, and goes on
        for prefetch in (1, 2):
            dali = ShardLoader(spec_for(root), "dali", prefetch=prefetch)
            dali_batches = list(dali)
            assert [b["key"] for b in dali_batches] == expected and dali.stats.skipped == {"undecodable": len(bad)}
            for a, b in zip(dali_batches, batches, strict=True):
                assert a["image"].shape[0] == len(a["key"]) and torch.equal(a["image"], b["image"])


def test_truncated_shard_delivers_the_samples_before_the_cut(synthetic_shards, tmp_path):
    root = corrupt_copy(synthetic_shards, tmp_path / "trunc", truncate=20_000)
    loader = ShardLoader(spec_for(root))
    keys = keys_of(loader)
    assert loader.stats.skipped["truncated"] > 0
    assert len(keys) + loader.stats.skipped["truncated"] == 230 // 8 * 8
    assert len(loader) == 230 // 8  # batch count unchanged: later batches are smaller instead


def test_resume_with_another_world_size_continues_at_the_same_global_position(synthetic_shards):
    loader = ShardLoader(spec_for(synthetic_shards, world=2, rank=0, batch=4))
    it = iter(loader)
    for _ in range(6):
        next(it)
    state = loader.state_dict()  # 6 steps x 2 ranks x 4 = 48 global samples
    single = ShardLoader(spec_for(synthetic_shards, world=1, batch=8))
    single.load_state_dict(state)
    assert single.batches_done == 6
    assert len(list(single)) == len(single) - 6 and single.epoch == 1


def test_build_loader_from_config_and_model_input(synthetic_shards):
    cfg = load_config(None, [f"data.source={synthetic_shards}", "data.image_size=16", "train.global_batch=8",
                             "train.micro_batch=4", "data.num_workers=2"])
    loader = config_loader(cfg, rank=1, world_size=2)
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
    x, y = to_model_input(batch, "cpu")
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    assert torch.allclose(x, batch["image"].float() / 127.5 - 1)
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        config_loader(load_config(None, ["data.source=/nonexistent", "data.image_size=16"]), 0, 1)


def test_load_time_crop_equals_the_offline_crop_on_the_pil_path(photo_shards, tmp_path):
    from pixeldit.data_pipelines.manifest import ImagePolicy
    from pixeldit.data_pipelines.writer import list_image_folder, write_shards
    items, classes = list_image_folder(str(photo_shards["src"]))
    offline = str(tmp_path / "offline")
    write_shards(items, classes, offline, policy=ImagePolicy("adm", 64, "png"), shard_samples=7, seed=1,
                 progress=False)
    at_load = {k: img for b in ShardLoader(spec_for(photo_shards["root"], batch=2, size=64))
               for k, img in zip(b["key"], b["image"])}
    stored = {k: img for b in ShardLoader(spec_for(offline, batch=2, size=64)) for k, img in zip(b["key"], b["image"])}
    # the odd-mode images were re-encoded to JPEG in the original-size shards: compare the rest
    common = (set(at_load) & set(stored)) - {"cmyk", "gray", "palette", "rgba"}
    assert len(common) > 10
    assert all(torch.equal(at_load[k], stored[k]) for k in common)


def test_every_kind_of_jpeg_decodes_to_pillows_pixels():
    """simplejpeg takes YCbCr and grayscale JPEGs (into the batch slot when already cropped),
    Pillow everything else: either way the pixels are Pillow's, and bad bytes raise."""
    import io

    import numpy as np
    from PIL import Image

    from pixeldit.data_pipelines import images

    from tests.photos import _photo

    rgb = Image.fromarray(_photo("chelsea")[:300, :400])
    cases = {
        "ycbcr 4:4:4, pre-cropped": (rgb.crop((0, 0, 48, 48)), {"quality": 95, "subsampling": 0}, False),
        "ycbcr 4:2:0, pre-cropped": (rgb.crop((0, 0, 48, 48)), {"quality": 80}, False),
        "ycbcr, original size": (rgb, {"quality": 90}, True),
        "gray, pre-cropped": (rgb.crop((0, 0, 48, 48)).convert("L"), {}, False),
        "cmyk, pre-cropped": (rgb.crop((0, 0, 48, 48)).convert("CMYK"), {}, False),
        "wrong size for pre-cropped": (rgb.crop((0, 0, 40, 56)), {}, False),
    }
    for name, (img, options, crop) in cases.items():
        out = io.BytesIO()
        img.save(out, "JPEG", **options)
        data = out.getvalue()
        slot = np.full((48, 48, 3), 7, dtype=np.uint8)
        images.decode_into(data, slot, crop)
        expected = images.decode_rgb(data)
        if crop or expected.size != (48, 48):
            expected = images.adm_center_crop(expected, 48)
        assert np.array_equal(slot, np.asarray(expected)), name
        # data.hflip mirrors inside the decode (Pillow's transpose, or whole pixels in the slot)
        images.decode_into(data, slot, crop, flip=True)
        assert np.array_equal(slot, np.asarray(expected)[:, ::-1]), f"{name}, mirrored"
        with pytest.raises((OSError, ValueError)):  # cut short: neither decoder may hand out a half image
            images.decode_into(data[: len(data) // 2], slot, crop)
