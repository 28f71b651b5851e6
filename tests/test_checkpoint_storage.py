"""Checkpoints on object storage: a real S3 endpoint (moto's server), exact resume and the crash contract.

One spawned process (FSDP2 and DeepSpeed need a process group, gloo of one rank here) runs every
phase, so the interpreter and DeepSpeed start once.
"""

import os

import pytest
import torch

from tests.dist import run_distributed

STEPS = 6
RESUME_AT = 4


class Killed(BaseException):
    """Stands for a kill: nothing in the save path catches it or cleans up after it."""


def _overrides(data, strategy, steps, root, endpoint):
    return [f"data.source={data}", "data.image_size=16", "model.patch_size=4", f"distributed.strategy={strategy}",
            "distributed.precision=fp32", "train.global_batch=8", "train.micro_batch=4", f"train.steps={steps}",
            "logging.tensorboard=false", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            f"checkpoint.dir={root}", f"checkpoint.endpoint_url={endpoint}", "ema.warmup=true", "schedule.stages[0].lr=1e-3"]


def _snapshot(trainer):
    return {"losses": list(trainer.state.history), "weights": trainer.strategy.checkpoint.full_state_dict(),
            "ema": {f.name: s.clone() for f, s in zip(trainer.ema.fragments, trainer.ema.shadow)}}


def _crash_in_ema_save(trainer):
    """The engine is written, then the process 'dies' (an exception nobody cleans up after)."""
    def crash(path, rank):
        raise Killed(f"killed while saving {path}")
    trainer.ema.save = crash


def _on_s3(rank, world, data, local, url, endpoint):
    from pixeldit.parallel.checkpoint import join, latest_checkpoint, read_text
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    def trainer(name, strategy, steps, root):
        return Trainer(load_config(None, _overrides(data, strategy, steps, root, endpoint)), os.path.join(local, name))

    out = {}
    # fsdp: engine and EMA through DCP's fsspec writer; straight, then resumed into another prefix
    straight = trainer("fsdp", "fsdp", STEPS, f"{url}/fsdp")
    straight.fit()
    out["fsdp"] = _snapshot(straight)
    resumed = trainer("fsdp_resumed", "fsdp", STEPS, f"{url}/fsdp_resumed")
    resumed.fit(f"{url}/fsdp/step_{RESUME_AT:08d}")
    out["fsdp_resumed"] = _snapshot(resumed)

    # a crash during the save of step 8: step 6 stays `latest` and loads
    crashing = trainer("crash", "fsdp", STEPS + 2, f"{url}/fsdp")
    _crash_in_ema_save(crashing)
    with pytest.raises(Killed, match="killed while saving"):
        crashing.fit()
    out["after_crash"] = {"latest": read_text(f"{url}/fsdp/latest"), "found": latest_checkpoint(f"{url}/fsdp"),
                          "step": _resumed_step(trainer("check", "fsdp", STEPS + 2, f"{url}/fsdp"))}
    # the next save of step 8 clears the crashed one's objects and completes
    trainer("again", "fsdp", STEPS + 2, f"{url}/fsdp").fit()
    out["after_retry"] = read_text(f"{url}/fsdp/latest")
    # re-saving step 8 from step 6 and crashing: step 8 lost its meta.json first, so `latest` falls back to 6
    resave = trainer("resave", "fsdp", STEPS + 2, f"{url}/fsdp")
    _crash_in_ema_save(resave)
    with pytest.raises(Killed):
        resave.fit(f"{url}/fsdp/step_{STEPS:08d}")
    out["after_resave_crash"] = {"latest": read_text(f"{url}/fsdp/latest"), "found": latest_checkpoint(f"{url}/fsdp")}

    # ddp: torch.save / torch.load through fsspec
    for name, resume in (("ddp", None), ("ddp_resumed", f"{url}/ddp/step_00000002")):
        run = trainer(name, "ddp", 4, f"{url}/{name}")
        run.fit(resume)
        out[name] = _snapshot(run)
    # damaged files on object storage: an unreadable `latest`, then a truncated meta.json of the newest step
    from pixeldit import storage
    from pixeldit.storage import options_for as storage_options
    ddp = f"{url}/ddp"
    storage.write_bytes(f"{ddp}/latest", b"\xff\xfe", storage_options(ddp))
    out["damaged_latest"] = latest_checkpoint(ddp)
    meta = f"{ddp}/step_00000004/meta.json"
    text = storage.read_bytes(meta, storage_options(meta))
    storage.write_bytes(meta, text[:len(text) // 2], storage_options(meta))
    out["damaged_meta"] = latest_checkpoint(ddp)

    # zero2: DeepSpeed's files staged locally and uploaded; resumed; then loaded through a universal conversion
    zero = trainer("zero2", "zero2", 4, f"{url}/zero2")
    zero.fit()
    out["zero2"] = _snapshot(zero)
    zero_resumed = trainer("zero2_resumed", "zero2", 4, f"{url}/zero2_resumed")
    zero_resumed.fit(f"{url}/zero2/step_00000002")
    out["zero2_resumed"] = _snapshot(zero_resumed)
    converted = trainer("zero2_universal", "zero2", 4, f"{url}/zero2")
    # a different saved world is what triggers the conversion; one rank exercises the whole remote path
    converted.strategy.checkpoint.load(join(f"{url}/zero2/step_00000004", "engine"), saved_world=2)
    out["zero2_universal"] = converted.strategy.checkpoint.full_state_dict()
    optimizer_state = converted.strategy.engine.optimizer.optimizer.state
    out["zero2_universal_steps"] = {int(s["step"]) for s in optimizer_state.values()}
    return out


def _resumed_step(trainer):
    assert trainer.resume()
    return trainer.state.step


def _objects(endpoint, bucket, prefix):
    keys = []
    for page in endpoint.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
    return keys


@pytest.fixture(scope="module")
def s3_runs(s3_endpoint, synthetic_shards, tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))
    bucket = s3_endpoint.make_bucket()
    local = str(tmp_path_factory.mktemp("s3_runs"))
    out = run_distributed(_on_s3, 1, synthetic_shards, local, f"s3://{bucket}/runs", s3_endpoint.url, timeout=600)[0]
    return {"out": out, "bucket": bucket, "local": local}


def _assert_same(a, b):
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_fsdp_checkpoints_on_s3_resume_bit_exactly(s3_runs, s3_endpoint):
    out = s3_runs["out"]
    straight, resumed = out["fsdp"], out["fsdp_resumed"]
    assert len(straight["losses"]) == STEPS
    assert resumed["losses"] == straight["losses"][RESUME_AT:]
    _assert_same(straight["weights"], resumed["weights"])
    _assert_same(straight["ema"], resumed["ema"])
    keys = _objects(s3_endpoint, s3_runs["bucket"], "runs/fsdp_resumed/")
    # the resumed run wrote step 6 alone: DCP folders for engine and EMA, our rank file, meta.json last
    assert {k.split("/")[0] for k in keys} == {"latest", "step_00000006"}, keys
    for part in ("meta.json", "rank_00000.pt", "engine/.metadata", "ema/.metadata"):
        assert f"step_00000006/{part}" in keys, part
    assert not os.path.exists(os.path.join(s3_runs["local"], "fsdp", "checkpoints"))  # nothing written locally


def test_a_crash_mid_save_on_s3_leaves_the_previous_checkpoint_loadable(s3_runs, s3_endpoint):
    out = s3_runs["out"]
    bucket = s3_runs["bucket"]
    crash = out["after_crash"]
    assert crash["latest"] == "step_00000006"
    assert crash["found"].endswith("/fsdp/step_00000006") and crash["step"] == STEPS
    assert out["after_retry"] == "step_00000008"
    resave = out["after_resave_crash"]
    assert resave["latest"] == "step_00000008"  # the pointer is not touched before the commit ...
    assert resave["found"].endswith("/fsdp/step_00000006")  # ... but step 8 is incomplete: the newest complete
    keys = _objects(s3_endpoint, bucket, "runs/fsdp/")
    assert "step_00000008/engine/.metadata" in keys and "step_00000008/meta.json" not in keys
    # keep_last=2: steps 2 and 4 were pruned after complete saves of 6 and 8
    assert {k.split("/")[0] for k in keys} == {"latest", "step_00000006", "step_00000008"}, keys


def test_damaged_files_on_s3_fall_back_to_the_newest_complete_checkpoint(s3_runs):
    out = s3_runs["out"]
    assert out["damaged_latest"].endswith("/ddp/step_00000004")  # `latest` unreadable: the newest complete
    assert out["damaged_meta"].endswith("/ddp/step_00000002")  # and its meta.json truncated: the one before


@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_ddp_and_zero_checkpoints_on_s3_resume_bit_exactly(s3_runs, name):
    straight, resumed = s3_runs["out"][name], s3_runs["out"][f"{name}_resumed"]
    assert len(straight["losses"]) == 4 and resumed["losses"] == straight["losses"][2:]
    _assert_same(straight["weights"], resumed["weights"])
    _assert_same(straight["ema"], resumed["ema"])


def test_zero_checkpoints_on_s3_are_staged_and_convert_to_universal(s3_runs, s3_endpoint):
    out = s3_runs["out"]
    straight = out["zero2"]
    _assert_same(straight["weights"], out["zero2_universal"])
    assert out["zero2_universal_steps"] == {4}
    keys = _objects(s3_endpoint, s3_runs["bucket"], "runs/zero2/step_00000004/engine/")
    assert "universal/converted.json" in keys and any(k.startswith("universal/zero/") for k in keys)
    assert any(k.startswith("engine/") and k.endswith("optim_states.pt") for k in keys)
