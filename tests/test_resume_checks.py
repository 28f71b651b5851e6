"""Resuming a run directory: the config check, finished runs, damaged checkpoints, and pruning that crashes.

One tiny real run (4 steps, checkpoints at 2 and 4) is trained once; each test damages or resumes a
copy of it.
"""

import json
import logging
import os
import shutil

import pytest

from pixeldit.errors import CheckpointError
from pixeldit.platform.config import load_config
from pixeldit.platform.trainer import Trainer

BASE = ["data.image_size=16", "model.patch_size=4", "train.global_batch=8", "train.micro_batch=8",
        "checkpoint.every_steps=2", "checkpoint.keep_last=3", "logging.tensorboard=false", "ema.warmup=true"]


def overrides(data, steps, *extra):
    return [f"data.source={data}", *BASE, f"train.steps={steps}", *extra]


def config(data, steps, *extra):
    return load_config(None, overrides(data, steps, *extra))


def cli_args(data, run, steps, *extra):
    args = ["train", "--run-dir", run]
    for assignment in overrides(data, steps, *extra):
        args += ["--set", assignment]
    return args


@pytest.fixture(scope="module")
def trained(synthetic_shards, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("resume_checks") / "run")
    Trainer(config(synthetic_shards, 4), run).fit()
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run directory."""
    copy = str(tmp_path / "run")
    shutil.copytree(trained, copy)
    return copy


def ckpt(run, step=None):
    root = os.path.join(run, "checkpoints")
    return root if step is None else os.path.join(root, f"step_{step:08d}")


# ---------------------------------------------------------------- which changes a resume may carry

def test_every_config_key_has_a_resume_policy():
    from pixeldit.platform.resume_check import undecided_keys
    assert undecided_keys() == []


def test_refused_changes_are_listed_and_allowed_ones_pass():
    from pixeldit.platform.resume_check import refused_changes

    saved = load_config(None, overrides("/data", 4)).to_dict()
    refused = ["model.hidden_size=64", "data.source=/other", "data.shuffle_window=64", "data.num_workers=2",
               "data.hflip=true", "train.global_batch=16", "train.seed=1", "diffusion.time_shift=3.0",
               "distributed.strategy=fsdp", "optim.betas=[0.9, 0.95]"]
    changes = refused_changes(saved, config("/data", 4, *refused))
    assert [key for key, _, _ in changes] == ["model.hidden_size", "data.source", "data.num_workers", "data.hflip",
                                              "data.shuffle_window", "diffusion.time_shift", "optim.betas",
                                              "distributed.strategy", "train.seed", "train.global_batch"]
    assert ("model.hidden_size", 128, 64) in changes and ("optim.betas", [0.9, 0.999], [0.9, 0.95]) in changes
    allowed = ["schedule.stages=[{start: 0, lr: 5e-4, clip: 0.5}]", "schedule.warmup_steps=10",
               "train.steps=100", "train.micro_batch=2", "logging.every_steps=7", "checkpoint.every_steps=5",
               "checkpoint.keep_last=1", "eval.every_steps=0", "data.retries=2", "data.io_timeout_s=30",
               "ema.decay=0.999", "train.activation_checkpointing=every", "distributed.precision=bf16",
               "distributed.timeout_s=60", "repa.block=2"]  # REPA is off on both sides: its block is moot
    assert refused_changes(saved, config("/data", 4, *allowed)) == []


def test_the_architecture_is_compared_resolved_not_as_written():
    from pixeldit.platform.resume_check import refused_changes

    saved = load_config(None, overrides("/data", 4, "model.hidden_size=null")).to_dict()  # the preset's 64
    assert refused_changes(saved, config("/data", 4, "model.hidden_size=64")) == []
    assert refused_changes(saved, config("/data", 4, "model.hidden_size=96")) == [("model.hidden_size", None, 96)]


def test_a_saved_preset_this_version_does_not_know_is_a_refused_change():
    from pixeldit.platform.resume_check import refused_changes

    saved = load_config(None, overrides("/data", 4)).to_dict()
    saved["model"]["name"] = "pixeldit-retired"
    assert refused_changes(saved, config("/data", 4)) == [("model.name", "pixeldit-retired", "pixeldit-tiny")]


def test_repa_and_precision_are_fixed_where_they_matter():
    from pixeldit.platform.resume_check import refused_changes

    repa = ["repa.mode=online", "repa.block=2", "repa.encoder_dim=32"]
    saved = load_config(None, overrides("/data", 4, *repa)).to_dict()
    assert refused_changes(saved, config("/data", 4, *repa, "repa.block=3")) == [("repa.block", 2, 3)]
    assert refused_changes(saved, config("/data", 4, *repa, "repa.weight=1.0")) == []
    assert refused_changes(saved, config("/data", 4, "repa.mode=off")) == [("repa.mode", "online", "off")]
    zero = load_config(None, overrides("/data", 4, "distributed.strategy=zero2")).to_dict()
    assert refused_changes(zero, config("/data", 4, "distributed.strategy=zero2", "distributed.precision=bf16")) \
        == [("distributed.precision", "fp32", "bf16")]


def test_the_data_is_compared_by_content():
    from pixeldit.platform.resume_check import refused_changes

    saved = load_config(None, overrides("/data", 4)).to_dict()
    moved = config("/mnt/copy", 4)
    assert refused_changes(saved, moved, "a" * 64, "a" * 64) == []  # the same shards, read from elsewhere
    assert refused_changes(saved, moved, "a" * 64, "b" * 64) == [("data.source", "/data", "/mnt/copy")]
    assert refused_changes(saved, moved) == [("data.source", "/data", "/mnt/copy")]  # a checkpoint without one
    # the same place holding other shards
    assert refused_changes(saved, config("/data", 4), "a" * 64, "b" * 64) == \
        [("data.source", f"/data (shards {'a' * 12})", f"/data (shards {'b' * 12})")]


def test_shards_moved_elsewhere_resume(synthetic_shards, run, tmp_path):
    moved = str(tmp_path / "moved")
    shutil.copytree(synthetic_shards, moved)
    trainer = Trainer(config(moved, 4), run)
    assert trainer.resume() and trainer.state.step == 4


def test_a_changed_architecture_is_one_line_through_the_cli(synthetic_shards, run, capsys, monkeypatch):
    from pixeldit.cli import main
    from pixeldit.parallel import checkpoint_state

    def no_load(*args, **kwargs):
        raise AssertionError("state was loaded before the config was checked")
    monkeypatch.setattr(checkpoint_state.DDPCheckpoint, "load", no_load)
    before = sorted(os.listdir(ckpt(run)))
    rc = main(cli_args(synthetic_shards, run, 4, "model.hidden_size=64", "train.global_batch=16",
                       "train.micro_batch=16", "schedule.warmup_steps=3"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pixeldit train")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(f"pixeldit train: error: cannot resume {ckpt(run, 4)} with this config: ")
    assert "model.hidden_size: 128 -> 64, train.global_batch: 8 -> 16 (" in line
    assert "schedule" not in line.split(" (")[0]  # an allowed change is not among the refused
    assert "lr stages" in line and "train.steps" in line and "--run-dir <another folder>" in line
    assert sorted(os.listdir(ckpt(run))) == before


def test_allowed_changes_resume_and_train_on(synthetic_shards, run):
    trainer = Trainer(config(synthetic_shards, 6, "schedule.stages=[{start: 0, lr: 5e-4, clip: 0.5}]",
                             "train.micro_batch=4", "logging.every_steps=3", "checkpoint.keep_last=1"), run)
    state = trainer.fit()
    assert state.step == 6 and len(state.history) == 2
    assert sorted(os.listdir(ckpt(run))) == ["latest", "step_00000006"]


def test_a_finished_run_says_so_and_runs_no_step(synthetic_shards, run, caplog, monkeypatch, capsys):
    from pixeldit.cli import main

    def no_step(self, batch):
        raise AssertionError("a finished run trained a step")
    monkeypatch.setattr(Trainer, "train_step", no_step)
    before = {n: os.path.getmtime(os.path.join(ckpt(run), n)) for n in os.listdir(ckpt(run))}
    with caplog.at_level(logging.INFO, logger="pixeldit.train"):
        assert main(cli_args(synthetic_shards, run, 4)) == 0
    complete = [r.getMessage() for r in caplog.records if "already complete" in r.getMessage()]
    assert complete == [f"{run} is already complete at step 4 (train.steps=4): nothing to train; to train further, "
                        f"run the same command with --set train.steps=N, N > 4"]
    assert capsys.readouterr().out == ""  # no banner, no "trained N steps" summary
    assert {n: os.path.getmtime(os.path.join(ckpt(run), n)) for n in os.listdir(ckpt(run))} == before


# ---------------------------------------------------------------- damaged run directories

def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def _truncate(path):
    data = open(path, "rb").read()
    _write(path, data[:len(data) // 2])


DAMAGE = {
    # name: (damage, the checkpoint used instead, what the warning names)
    "latest_not_utf8": (lambda r: _write(os.path.join(ckpt(r), "latest"), b"\xff\xfestep"), 4,
                        "checkpoints/latest is not UTF-8"),
    "latest_garbage": (lambda r: _write(os.path.join(ckpt(r), "latest"), b"hello"), 4,
                       "checkpoints/latest holds 'hello', not a step_NNNNNNNN name"),
    "latest_missing": (lambda r: os.remove(os.path.join(ckpt(r), "latest")), 4, "checkpoints/latest is missing"),
    "latest_names_a_missing_folder": (lambda r: _write(os.path.join(ckpt(r), "latest"), b"step_00000099\n"), 4,
                                      "latest names step_00000099, which is not there"),
    "meta_empty": (lambda r: _write(os.path.join(ckpt(r, 4), "meta.json"), b""), 2,
                   "step_00000004/meta.json is empty"),
    "meta_truncated": (lambda r: _truncate(os.path.join(ckpt(r, 4), "meta.json")), 2,
                       "step_00000004/meta.json is not valid JSON, truncated or damaged"),
    "meta_not_utf8": (lambda r: _write(os.path.join(ckpt(r, 4), "meta.json"), b'{"step": \xff}'), 2,
                      "step_00000004/meta.json is not UTF-8"),
    "meta_missing": (lambda r: os.remove(os.path.join(ckpt(r, 4), "meta.json")), 2,
                     "step_00000004/meta.json is missing"),
    "meta_of_something_else": (lambda r: _write(os.path.join(ckpt(r, 4), "meta.json"), b'{"step": 4}'), 2,
                               "step_00000004/meta.json lacks world, strategy, state, ema_updates, model, config "
                               "(damaged, or not one of our checkpoints)"),
    "rank_file_missing": (lambda r: os.remove(os.path.join(ckpt(r, 4), "rank_00000.pt")), 2,
                          "step_00000004 lacks rank_00000.pt (its meta.json says 1 rank(s) saved it)"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_newest_complete_one(run, name, caplog):
    from pixeldit.parallel.checkpoint import latest_complete
    from pixeldit.platform.export import resolve_checkpoint

    damage, used, named = DAMAGE[name]
    damage(run)
    with caplog.at_level(logging.WARNING, logger="pixeldit.parallel.checkpoint"):
        path, meta = latest_complete(ckpt(run))
    assert path == ckpt(run, used) and meta["step"] == used
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"using {ckpt(run, used)}, the newest complete"), warnings
    assert named in warnings[0], warnings[0]
    assert resolve_checkpoint(run) == ckpt(run, used)  # `pixeldit export` of the run directory agrees


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one_and_is_rewritten(synthetic_shards, run):
    _truncate(os.path.join(ckpt(run, 4), "meta.json"))
    trainer = Trainer(config(synthetic_shards, 4), run)
    state = trainer.fit()
    assert state.step == 4 and len(state.history) == 2  # resumed at 2, trained 3 and 4
    meta = json.loads(open(os.path.join(ckpt(run, 4), "meta.json")).read())  # the re-save replaced the damage
    assert meta["step"] == 4
    assert open(os.path.join(ckpt(run), "latest")).read() == "step_00000004"


def test_no_complete_checkpoint_is_one_error_naming_the_folder(synthetic_shards, run, capsys):
    from pixeldit.cli import main
    from pixeldit.parallel.checkpoint import read_meta

    _write(os.path.join(ckpt(run), "latest"), b"\xff")
    _write(os.path.join(ckpt(run, 4), "meta.json"), b"")
    _truncate(os.path.join(ckpt(run, 2), "meta.json"))
    assert main(cli_args(synthetic_shards, run, 4)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pixeldit train")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"pixeldit train: error: {ckpt(run)} holds no complete checkpoint to resume (")
    for named in ("latest is not UTF-8", "step_00000004/meta.json is empty", "step_00000002/meta.json is not valid"):
        assert named in lines[0]
    assert "move the folder away to start a fresh run" in lines[0]
    # a checkpoint named explicitly is used or refused, never replaced by another
    with pytest.raises(CheckpointError, match=r"step_00000004 is not a complete checkpoint: .*meta\.json is empty"):
        read_meta(ckpt(run, 4))


def test_a_missing_checkpoint_is_also_a_file_not_found_and_a_damaged_one_is_not(run):
    from pixeldit.errors import CheckpointNotFound
    from pixeldit.parallel.checkpoint import latest_complete, load_rank_state, read_meta

    os.remove(os.path.join(ckpt(run, 4), "meta.json"))
    with pytest.raises(CheckpointNotFound, match=r"step_00000004/meta\.json is missing") as missing:
        read_meta(ckpt(run, 4))
    assert isinstance(missing.value, FileNotFoundError) and isinstance(missing.value, CheckpointError)
    with pytest.raises(FileNotFoundError, match=r"step_00000002/rank_00001\.pt is missing"):
        load_rank_state(ckpt(run, 2), 1)
    _write(os.path.join(ckpt(run, 2), "meta.json"), b"{")
    with pytest.raises(CheckpointError, match=r"step_00000002/meta\.json is not valid JSON") as damaged:
        read_meta(ckpt(run, 2))
    assert not isinstance(damaged.value, FileNotFoundError)  # damaged, not absent
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint to resume"):
        latest_complete(ckpt(run))


def test_a_first_save_that_never_completed_starts_a_fresh_run(run, caplog):
    from pixeldit.parallel.checkpoint import latest_complete

    os.remove(os.path.join(ckpt(run), "latest"))
    for step in (2, 4):
        os.remove(os.path.join(ckpt(run, step), "meta.json"))
    with caplog.at_level(logging.WARNING, logger="pixeldit.parallel.checkpoint"):
        assert latest_complete(ckpt(run)) is None
    assert "starting a fresh run" in caplog.text and "step_00000004/meta.json is missing" in caplog.text


# ---------------------------------------------------------------- pruning

class Killed(BaseException):
    """Stands for a kill: nothing in the save path catches it."""


def _failing_rmtree(monkeypatch, victim: str, error: BaseException):
    """shutil.rmtree fails on the folder named `victim`, after remove() has deleted its meta.json."""
    from pixeldit import storage
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if os.path.basename(str(path).rstrip("/")) == victim:
            assert not os.path.exists(os.path.join(path, "meta.json")), "the commit marker must go first"
            raise error
        return real(path, *args, **kwargs)
    monkeypatch.setattr(storage.shutil, "rmtree", rmtree)


def _prune_config(data, steps):
    return config(data, steps, "checkpoint.every_steps=1", "checkpoint.keep_last=1")


def test_a_kill_while_pruning_leaves_a_resumable_run(synthetic_shards, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    _failing_rmtree(monkeypatch, "step_00000001", Killed("killed while pruning"))
    with pytest.raises(Killed):
        Trainer(_prune_config(synthetic_shards, 3), run).fit()  # the prune after saving step 2
    assert sorted(os.listdir(ckpt(run))) == ["latest", "step_00000001", "step_00000002"]
    assert not os.path.exists(os.path.join(ckpt(run, 1), "meta.json"))  # half deleted, not complete
    monkeypatch.undo()
    trainer = Trainer(_prune_config(synthetic_shards, 3), run)
    assert trainer.resume() and trainer.state.step == 2
    assert trainer.fit().step == 3
    assert sorted(os.listdir(ckpt(run))) == ["latest", "step_00000003"]  # the leftover went with the next prune


def test_a_deletion_error_while_pruning_is_reported(synthetic_shards, tmp_path, monkeypatch, caplog):
    run = str(tmp_path / "run")
    victim = os.path.join(ckpt(run), "step_00000001")
    _failing_rmtree(monkeypatch, "step_00000001", PermissionError(13, "Permission denied", victim))
    with caplog.at_level(logging.WARNING, logger="pixeldit.parallel.checkpoint"):
        assert Trainer(_prune_config(synthetic_shards, 2), run).fit().step == 2  # the run goes on
    warnings = [r.getMessage() for r in caplog.records if "could not delete" in r.getMessage()]
    assert warnings == [f"could not delete the old checkpoint {victim} (PermissionError: [Errno 13] Permission "
                        f"denied: '{victim}'); its meta.json is gone, so it is never resumed from: delete the rest "
                        f"by hand or let the next save retry"]
