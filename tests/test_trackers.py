"""Weights & Biases beside TensorBoard: the same scalars, images and config, read back from an offline run."""

import glob
import json
import os
import struct
import time

import pytest

from pixeldit.platform.trainer import Trainer
from tests.test_trainer import config, scalars

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install '.[wandb]' or '.[test]')")


def wandb_records(path: str):
    """The records of a .wandb file, parsed with wandb's own protobuf schema. The file is a LevelDB-style
    log (wandb's Python reader is gone from recent releases): a 7-byte header, then 32 KiB blocks of
    [crc32 u32, length u16, type u8, payload] chunks, type 1 a whole record, 2/3/4 its first/middle/last part."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(folder: str, timeout_s: float = 30.0) -> dict:
    """{"config": {...}, "history": [{key: value}, ...]} of one offline run folder. wandb's service
    process writes the file and may still be writing its end after `finish()` returned: wait for the
    run's exit record."""
    (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s} s (wandb did not finish it)"
        time.sleep(0.1)
    run = {"config": {}, "history": []}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            run["config"].update({i.key: json.loads(i.value_json) for i in items})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
    return run


def test_wandb_offline_run_holds_what_tensorboard_holds(synthetic_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # pytest owns stdout; wandb's console capture would wrap it
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir = str(tmp_path)
    extra = ["logging.every_steps=2", "logging.wandb=true", "logging.wandb_project=pixeldit-test",
             "logging.sample_every_steps=2", "logging.sample_steps=2"]
    Trainer(config(synthetic_shards, 4, *extra), run_dir).fit()

    (folder,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    run = read_offline_run(folder)
    assert run["config"]["model"]["name"] == "pixeldit-tiny" and run["config"]["train"]["steps"] == 4
    assert run["config"]["logging"]["wandb_project"] == "pixeldit-test"
    assert run["config"]["provenance"]["world"] == 1 and "packages" in run["config"]["provenance"]

    acc = scalars(run_dir)
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "perf/images_per_s" in tags
    for tag in tags:
        tensorboard = {e.step: e.value for e in acc.Scalars(tag)}
        logged = {row["trainer/step"]: row[tag] for row in run["history"] if tag in row}
        assert logged.keys() == tensorboard.keys() == {2, 4}, tag
        for step, value in tensorboard.items():
            assert logged[step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard stores float32

    images = [row for row in run["history"] if row.get("samples/ema/_type") == "image-file"]
    assert [row["trainer/step"] for row in images] == [2, 4]
    assert acc.Tags()["images"] == ["samples/ema"]
    for row in images:
        assert os.path.getsize(os.path.join(folder, "files", row["samples/ema/path"])) == row["samples/ema/size"]

    # a finished run opens no tracker: no W&B run resumed for nothing, no empty TensorBoard event file
    events = sorted(os.listdir(os.path.join(run_dir, "tensorboard")))
    finished = Trainer(config(synthetic_shards, 4, *extra), run_dir)
    finished.fit()
    assert finished.already_complete
    assert glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")) == [folder]
    assert sorted(os.listdir(os.path.join(run_dir, "tensorboard"))) == events

    # a resumed training continues the same W&B run (one id per run directory)
    Trainer(config(synthetic_shards, 6, *extra), run_dir).fit()
    folders = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))
    assert len(folders) == 2 and folders[0].split("-")[-1] == folders[1].split("-")[-1]
    assert [row["trainer/step"] for row in read_offline_run(folders[1])["history"] if "train/loss" in row] == [6]


def test_wandb_without_credentials_is_one_config_error(tmp_path, monkeypatch):
    from pixeldit.errors import ConfigError
    from pixeldit.platform.trackers import WandbTracker

    wandb.teardown()  # wandb keeps the settings it read from the environment in a process-wide singleton
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(ConfigError, match=r"^logging\.wandb=true: wandb could not start a run .*WANDB_MODE=offline"):
        WandbTracker(str(tmp_path), "pixeldit-test", {})
