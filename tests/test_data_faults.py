"""Content faults in real shard files: what is skipped, counted, listed, and what stops a run."""

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from pixeldit.data_pipelines.lanes import LoaderSpec
from pixeldit.data_pipelines.loader import ShardLoader, join_all
from pixeldit.data_pipelines.manifest import load_manifest, save_manifest
from pixeldit.data_pipelines.source import EpochPlan, Split
from pixeldit.data_pipelines.tario import ShardWriter, intact_samples, iter_samples, parse_index
from pixeldit.errors import ConfigError, DataError, PixelDiTError
from pixeldit.platform.config import load_config
from tests.loaders import config_loader

BATCH, KEPT = 8, 230 // 8 * 8  # the synthetic set: 230 samples, 10 classes


def spec_for(root, lanes=1):
    return LoaderSpec(load_manifest(root), root, 16, BATCH, 0, Split(1, 0, lanes, BATCH), 16, False, None)


def epoch_keys(root, lanes=1):
    """The keys a clean copy of the set delivers in one epoch (the dropped remainder left out)."""
    return [k for b in ShardLoader(spec_for(root, lanes)) for k in b["key"]]


def rewrite_labels(src, dst, labels: dict[str, bytes | None]) -> str:
    """A copy of the set whose samples `labels` names carry that .cls (None: no .cls at all),
    rewritten as real tar files with their index and manifest entry."""
    shutil.copytree(src, dst)
    manifest = load_manifest(str(dst))
    for shard in manifest.shards:
        path = Path(dst, shard.name)
        with open(path, "rb") as f:
            samples = list(iter_samples(f, str(path)))
        if not any(key in labels for key, _ in samples):
            continue
        out = io.BytesIO()
        writer = ShardWriter(out)
        for key, files in samples:
            if key in labels:
                files = {ext: data for ext, data in files.items() if ext != "cls"}
                if labels[key] is not None:
                    files["cls"] = labels[key]
            writer.add(key, files)
        shard.bytes, shard.sha256 = writer.close()
        path.write_bytes(out.getvalue())
        Path(dst, shard.index).write_text(writer.index_text())
        assert hashlib.sha256(out.getvalue()).hexdigest() == shard.sha256
    save_manifest(str(dst), manifest)
    return str(dst)


def cut(src, dst, shard: int, size: int) -> tuple[str, list[str]]:
    """A copy of the set with shard `shard` cut to its first `size` bytes; the keys it cuts."""
    shutil.copytree(src, dst)
    info = load_manifest(str(dst)).shards[shard]
    path = Path(dst, info.name)
    path.write_bytes(path.read_bytes()[:size])
    entries = parse_index(Path(dst, info.index).read_text(), "index")
    return str(dst), entries.keys[intact_samples(entries, size):]


def check_epoch(loader, reference: list[str], bad: dict[str, str]):
    """One epoch: every good sample of `reference` exactly once, in order; the bad ones counted by
    reason and listed by shard and key; nothing else missing."""
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert keys == [k for k in reference if k not in bad]
    assert all(len(b["label"]) == len(b["key"]) == b["image"].shape[0] for b in batches)
    skipped = {k: r for k, r in bad.items() if k in reference}
    counts = {}
    for reason in skipped.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert loader.stats.skipped == counts
    assert len(keys) + sum(counts.values()) == KEPT
    return batches


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if os.path.exists(path) else []


BAD_LABELS = {b"x1": "bad_label", None: "bad_label", b"-4": "label_out_of_range",
              b"100000": "label_out_of_range", b"10": "label_out_of_range"}  # 10 classes: 10 is the null row


@pytest.fixture(scope="module")
def bad_label_set(synthetic_shards, tmp_path_factory):
    reference = epoch_keys(synthetic_shards)
    # spread over two shards and batches, all inside the epoch (not in the dropped remainder)
    chosen = [reference[i] for i in (3, 50, 51, 120, 200)]
    labels = dict(zip(chosen, BAD_LABELS))
    root = rewrite_labels(synthetic_shards, tmp_path_factory.mktemp("labels") / "set", labels)
    return root, synthetic_shards, dict(zip(chosen, BAD_LABELS.values()))


@pytest.mark.parametrize("decoder,workers", [("pil", 0), ("pil", 2), ("dali", 0)])
def test_bad_labels_are_skipped_counted_and_listed(bad_label_set, tmp_path, decoder, workers):
    root, clean, bad = bad_label_set
    reference = epoch_keys(clean, lanes=max(1, workers))
    log = str(tmp_path / "skipped.jsonl")
    loader = ShardLoader(spec_for(root, max(1, workers)), decoder, workers, skipped_log=log)
    batches = check_epoch(loader, reference, bad)
    labels = torch.cat([b["label"] for b in batches])
    assert 0 <= labels.min() and labels.max() < 10
    listed = read_jsonl(log)
    assert {r["key"]: r["reason"] for r in listed} == bad
    shards = {s.name for s in load_manifest(root).shards}
    assert all(r["shard"] in shards and r["epoch"] == 0 and r["detail"] for r in listed)
    scalars = loader.stats.scalars()
    assert scalars["data/skipped/bad_label"] == 2 and scalars["data/skipped/label_out_of_range"] == 3
    assert scalars["data/skipped/truncated"] == 0
    loader.close()


@pytest.mark.parametrize("decoder,workers", [("pil", 0), ("pil", 2), ("dali", 0)])
def test_a_shard_cut_mid_file_delivers_every_sample_before_the_cut(synthetic_shards, tmp_path, decoder, workers):
    size = load_manifest(synthetic_shards).shards[1].bytes // 2
    root, cut_keys = cut(synthetic_shards, tmp_path / "cut", 1, size)
    assert 0 < len(cut_keys) < 40 and any(k in epoch_keys(synthetic_shards) for k in cut_keys)
    loader = ShardLoader(spec_for(root, max(1, workers)), decoder, workers)
    clean = ShardLoader(spec_for(synthetic_shards, max(1, workers)))
    for _ in range(2):  # every epoch, not only the first
        check_epoch(loader, [k for b in clean for k in b["key"]], dict.fromkeys(cut_keys, "truncated"))
        loader.stats.skipped.clear()
    loader.close()


def test_skip_budget_stops_the_epoch_with_one_clear_line(bad_label_set, tmp_path):
    root, clean, bad = bad_label_set
    reference = epoch_keys(clean)
    # 5 bad of 224: 0.02 allows 4.48 samples, 0.025 allows 5.6
    with pytest.raises(DataError, match=r"5 samples of epoch 0 skipped .* over the budget of 4.48 "
                                        r"\(data.max_skipped_fraction=0.02 .*raise data.max_skipped_fraction") as e:
        list(ShardLoader(spec_for(root), max_skipped_fraction=0.02))
    assert "\n" not in str(e.value)
    check_epoch(ShardLoader(spec_for(root), max_skipped_fraction=0.025), reference, bad)


def test_resume_lists_each_skipped_sample_once(bad_label_set, tmp_path):
    root, clean, bad = bad_label_set
    reference = epoch_keys(clean)
    whole = str(tmp_path / "whole.jsonl")
    for _ in range(2):
        list(ShardLoader(spec_for(root), skipped_log=whole).__iter__())
    once = read_jsonl(whole)[:5]
    log = str(tmp_path / "skipped.jsonl")
    first = ShardLoader(spec_for(root), skipped_log=log)
    it = iter(first)
    for _ in range(8):
        next(it)
    state = first.state_dict()
    for _ in range(10):  # past the checkpoint: these batches are read again after the resume
        next(it)
    assert len(read_jsonl(log)) == 4
    resumed = ShardLoader(spec_for(root), skipped_log=log)
    resumed.load_state_dict(state)
    keys = [k for b in resumed for k in b["key"]]
    assert keys == [k for k in reference[8 * BATCH:] if k not in bad]  # exact resume
    assert read_jsonl(log) == once
    assert resumed.stats.skipped == {"bad_label": 2, "label_out_of_range": 3}


def test_model_class_count_is_checked_against_the_manifest(synthetic_shards):
    def cfg(classes):
        return load_config(None, [f"data.source={synthetic_shards}", "data.image_size=16", "train.global_batch=8",
                                  "train.micro_batch=8", f"model.num_classes={classes}"])
    for classes in (4, 11):
        with pytest.raises(ConfigError, match=f"model.num_classes={classes} but .* has 10 classes; "
                                              f"train with --set model.num_classes=10"):
            config_loader(cfg(classes), 0, 1)
    assert len(config_loader(cfg(10), 0, 1)) == KEPT // 8


def test_sampling_draws_only_the_classes_the_runs_data_had():
    from pixeldit.jobs.sample import ModelSource, check_data_classes
    run = ModelSource("run", "/runs/a", "ema", 4, 16, 1.0, data_classes=4)
    assert check_data_classes(None, 10, run) == [0, 1, 2, 3]
    assert check_data_classes([1, 3], 10, run) == [1, 3]
    with pytest.raises(ConfigError, match=r"--classes \[7\]: .* data with 4 classes; pick classes in 0..3"):
        check_data_classes([1, 7], 10, run)
    assert check_data_classes(None, 10, ModelSource("export", "x.safetensors", "ema")) is None


def train_argv(run_dir, data):
    return ["train", "--run-dir", str(run_dir), "--set", f"data.source={data}", "--set", "data.image_size=16",
            "--set", "model.patch_size=4", "--set", "train.global_batch=8", "--set", "train.micro_batch=8",
            "--set", "train.steps=4", "--set", "logging.tensorboard=false"]


def test_train_on_an_all_cut_set_or_a_deleted_shard_fails_with_one_line(synthetic_shards, tmp_path, capsys):
    from pixeldit.cli import main
    all_cut = tmp_path / "all_cut"
    shutil.copytree(synthetic_shards, all_cut)
    for shard in load_manifest(str(all_cut)).shards:
        path = all_cut / shard.name
        path.write_bytes(path.read_bytes()[:1000])  # `head -c 1000`
    assert main(train_argv(tmp_path / "run1", all_cut)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pixeldit train: error: ") and "truncated 8" in err[-1]
    assert "max_skipped_fraction" in err[-1]
    assert not os.path.exists(tmp_path / "run1" / "checkpoints") or not os.listdir(tmp_path / "run1" / "checkpoints")
    listed = read_jsonl(tmp_path / "run1" / "skipped.jsonl")
    assert len(listed) == 8 and {r["reason"] for r in listed} == {"truncated"}

    deleted = tmp_path / "deleted"
    shutil.copytree(synthetic_shards, deleted)
    manifest = load_manifest(str(deleted))
    first = EpochPlan(manifest, 0, 0, Split(1, 0, 1, 8)).sequence()[0]  # the run's first sample
    os.remove(deleted / manifest.shards[EpochPlan(manifest, 0, 0, Split(1, 0, 1, 8)).locate(first)[0]].name)
    assert main(train_argv(tmp_path / "run2", deleted)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("pixeldit train: error: ")


def test_the_class_check_stops_train_before_any_work(synthetic_shards, tmp_path, capsys):
    from pixeldit.cli import main
    assert main(train_argv(tmp_path / "run", synthetic_shards) + ["--set", "model.num_classes=11"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("pixeldit train: error: model.num_classes=11") and "--set model.num_classes=10" in line


def test_a_join_that_times_out_names_what_the_thread_was_doing(caplog):
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="reader-7", daemon=True)
    stuck.start()
    start = time.monotonic()
    with caplog.at_level(logging.ERROR):
        join_all([stuck], 0.3, {"reader-7": "reading batch 12 (lane 1) from storage"})
    assert time.monotonic() - start < 2
    assert "reader-7: reading batch 12 (lane 1) from storage" in caplog.text
    release.set()
    stuck.join()


def test_skips_reach_tensorboard_and_the_run_dirs_list(bad_label_set, tmp_path, caplog):
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pixeldit.platform.trainer import train
    root, clean, bad = bad_label_set
    cfg = load_config(None, [f"data.source={root}", "data.image_size=16", "model.patch_size=4",
                             "train.global_batch=8", "train.micro_batch=8", "train.steps=1", "data.num_workers=0",
                             "train.seed=0", "data.shuffle_window=16",  # the order epoch_keys reads
                             "data.max_skipped_fraction=0.05", "logging.every_steps=1"])
    with caplog.at_level(logging.INFO, logger="pixeldit"):
        train(cfg, str(tmp_path))
    first_batch = epoch_keys(clean)[:8]
    skipped = [k for k in first_batch if k in bad]
    assert len(skipped) == 1  # the fixture put one bad label into the first batch
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars(f"data/skipped/{bad[skipped[0]]}")] == [1]
    assert [e.value for e in acc.Scalars("data/skipped/truncated")] == [0]
    assert [r["key"] for r in read_jsonl(tmp_path / "skipped.jsonl")] == skipped
    step_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/1 "))
    assert "data retries 0  data skipped 1  " in step_line, step_line  # and on the console


def test_a_batch_buffer_is_lent_until_the_last_tensor_on_its_memory_dies():
    from pixeldit.data_pipelines.loader import BatchBuffers
    buffers = BatchBuffers()
    first = buffers.take((2, 4, 4, 3))
    first_address = first.data_ptr()
    kept = first.numpy()[1]  # what outlives the batch tensor: a numpy view of it
    del first
    second = buffers.take((2, 4, 4, 3))
    second_address = second.data_ptr()
    assert second_address != first_address
    del second
    third = buffers.take((2, 4, 4, 3))
    assert third.data_ptr() == second_address  # back in the pool once nothing used it
    del kept
    assert buffers.take((2, 4, 4, 3)).data_ptr() == first_address


def test_a_fresh_start_in_a_run_dir_with_a_list_starts_the_list_again(bad_label_set, tmp_path):
    root, clean, bad = bad_label_set
    log = str(tmp_path / "skipped.jsonl")
    for _ in range(2):  # a run that stopped before its first checkpoint, then the same run again
        loader = ShardLoader(spec_for(root), skipped_log=log)
        list(loader)
    assert sorted(r["key"] for r in read_jsonl(log)) == sorted(bad)


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_an_epoch_without_a_sample_is_an_error_whatever_the_budget(synthetic_shards, tmp_path, decoder):
    root = tmp_path / "all_cut"
    shutil.copytree(synthetic_shards, root)
    for shard in load_manifest(str(root)).shards:
        (root / shard.name).write_bytes((root / shard.name).read_bytes()[:1000])
    loader = ShardLoader(spec_for(str(root)), decoder, max_skipped_fraction=1.0)
    batches = []
    with pytest.raises(DataError, match=r"epoch 0 delivered no sample \(truncated 224\)"):
        for batch in loader:  # empty batches keep the epoch's batch count (DALI never sees them)
            batches.append(batch)
    assert len(batches) == KEPT // BATCH and all(b["image"].shape == (0, 3, 16, 16) for b in batches)


def flip_name_bit(src, dst, shard: int, sample: int) -> tuple[str, str, Path]:
    """A copy of the set with one bit of the first member name of `sample` in `shard` flipped."""
    shutil.copytree(src, dst)
    info = load_manifest(str(dst)).shards[shard]
    path = Path(dst, info.name)
    data = bytearray(path.read_bytes())
    entries = parse_index(Path(dst, info.index).read_text(), "index")
    data[entries[sample].offset + 2] ^= 0x01
    path.write_bytes(bytes(data))
    return str(dst), entries[sample].key, Path(dst, info.index)


def test_a_damaged_member_header_is_read_by_a_sound_index_else_skipped(synthetic_shards, tmp_path):
    reference = epoch_keys(synthetic_shards)
    sample = next(i for i in range(40) if epoch_keys_member(synthetic_shards, 1, i) in reference)
    root, key, index = flip_name_bit(synthetic_shards, tmp_path / "flip", 1, sample)
    check_epoch(ShardLoader(spec_for(root)), reference, {})  # the index still locates every byte
    # an index whose offsets for that sample do not follow each other cannot stand in for its header
    lines = index.read_text().splitlines()
    fields = lines[sample + 1].split()
    fields[5] = str(int(fields[5]) + 512)
    lines[sample + 1] = " ".join(fields)
    index.write_text("\n".join(lines) + "\n")
    log = tmp_path / "skipped.jsonl"
    check_epoch(ShardLoader(spec_for(root), skipped_log=str(log)), reference, {key: "corrupt_header"})
    assert [(r["key"], r["reason"]) for r in read_jsonl(log)] == [(key, "corrupt_header")]


def epoch_keys_member(root, shard: int, member: int) -> str:
    info = load_manifest(root).shards[shard]
    return parse_index(Path(root, info.index).read_text(), "index")[member].key


def test_a_damaged_index_is_one_line_naming_it_and_the_fix(synthetic_shards, tmp_path):
    root = str(tmp_path / "idx")
    shutil.copytree(synthetic_shards, root)
    index = Path(root, load_manifest(root).shards[0].index)
    index.write_text(index.read_text().replace(" ", " x", 1))
    with pytest.raises(DataError, match=rf"{index.name}: damaged index .*`pixeldit shards verify`") as e:
        list(ShardLoader(spec_for(root)))
    assert "\n" not in str(e.value)


def test_a_half_written_last_line_of_the_list_is_dropped(bad_label_set, tmp_path):
    root, clean, bad = bad_label_set
    log = tmp_path / "skipped.jsonl"
    first = ShardLoader(spec_for(root), skipped_log=str(log))
    it = iter(first)
    for _ in range(8):
        next(it)
    state = first.state_dict()
    written = read_jsonl(log)
    assert written
    log.write_text(log.read_text() + '{"shard": "train-0000')  # a crash in the middle of a write
    resumed = ShardLoader(spec_for(root), skipped_log=str(log))
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert read_jsonl(log)[:len(written)] == written
    log.write_text('{"shard": "train-0000\n' + log.read_text())  # damage anywhere else is not a crash's
    with pytest.raises(DataError, match="line 1 is not JSON"):
        again = ShardLoader(spec_for(root), skipped_log=str(log))
        again.load_state_dict(state)
        next(iter(again))


def test_resume_of_an_older_state_at_the_epoch_end_and_at_another_world_size(bad_label_set):
    root, clean, bad = bad_label_set
    loader = ShardLoader(spec_for(root))
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    state = loader.state_dict()
    assert state["epoch_skipped"] == {"bad_label": 2, "label_out_of_range": 3}
    old = {k: v for k, v in state.items() if not k.startswith("epoch_") or k == "epoch"}
    old["stats"] = {"retries": 0, "corrupt": 0, "unreadable": 0}  # counts as written before skip reasons
    resumed = ShardLoader(spec_for(root))
    resumed.load_state_dict(old)
    assert list(resumed) == [] and resumed.epoch == 1  # the finished epoch is not "an epoch without a sample"
    # another world size: the old split's losses do not count against the new split's budget
    other = ShardLoader(LoaderSpec(load_manifest(root), root, 16, 4, 0, Split(2, 0, 1, 4), 16, False, None),
                        max_skipped_fraction=0.0)
    state = dict(state, batches_done=10, epoch_lost=5, epoch_delivered=75)
    other.load_state_dict(state)
    assert (other.batches_done, other.epoch_lost, other.epoch_skipped) == (10, 0, {})


def test_a_cut_shard_warns_once_and_counts_every_sample(synthetic_shards, tmp_path, caplog):
    size = load_manifest(synthetic_shards).shards[1].bytes // 2
    root, cut_keys = cut(synthetic_shards, tmp_path / "cut", 1, size)
    with caplog.at_level(logging.WARNING, logger="pixeldit.data_pipelines.loader"):
        loader = ShardLoader(spec_for(root))
        list(loader)
    warnings = [r for r in caplog.records if "(truncated)" in r.getMessage()]
    assert len(warnings) == 1 and loader.stats.skipped["truncated"] > 1


def test_wrong_setups_are_one_line_errors(synthetic_shards):
    from pixeldit.errors import CheckpointError
    with pytest.raises(ConfigError, match="cannot fill one global batch of 240"):
        EpochPlan(load_manifest(synthetic_shards), 0, 0, Split(2, 0, 1, 120))
    state = ShardLoader(spec_for(synthetic_shards)).state_dict()
    with pytest.raises(CheckpointError, match="train.seed=5.*resume with the data.source and train.seed"):
        ShardLoader(spec_for(synthetic_shards)).load_state_dict(dict(state, seed=5))


def test_a_cut_feature_shard_skips_its_samples_as_truncated(tmp_path):
    from pixeldit.cli import main
    from pixeldit.data_pipelines.features import load_feature_manifest
    from pixeldit.data_pipelines.writer import synthetic_items, write_shards
    from tests.encoders import save_meta_weights
    images, features = str(tmp_path / "images"), str(tmp_path / "features")
    items, classes = synthetic_items(10, 5, 32, seed=3)
    write_shards(items, classes, images, shard_samples=16, progress=False)  # 50 samples: 16 16 16 2
    weights = save_meta_weights(tmp_path / "dinov2_tiny_pretrain.pth")
    assert main(["repa-cache", "--data", images, "--out", features, "--encoder", str(weights),
                 "--image-size", "32"]) == 0

    def lockstep():
        spec = LoaderSpec(load_manifest(images), images, 32, BATCH, 0, Split(1, 0, 1, BATCH), 8, False, None,
                          features=load_feature_manifest(features), features_root=features)
        return ShardLoader(spec)

    reference = [k for b in lockstep() for k in b["key"]]
    info = load_feature_manifest(features).shards[1]
    path = Path(features, info.name)
    path.write_bytes(path.read_bytes()[:info.bytes // 2])
    entries = parse_index(Path(features, info.index).read_text(), "index")
    cut_keys = set(entries.keys[intact_samples(entries, info.bytes // 2):]) & set(reference)
    assert cut_keys
    loader = lockstep()
    batches = list(loader)
    assert [k for b in batches for k in b["key"]] == [k for k in reference if k not in cut_keys]
    assert all(b["repa"].shape[0] == len(b["key"]) for b in batches)
    assert loader.stats.skipped == {"truncated": len(cut_keys)}
