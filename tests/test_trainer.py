"""The training loop in one process: logging read back, schedules, guards, accumulation, AC, export."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pixeldit.platform.config import load_config
from pixeldit.platform.trainer import Trainer


def config(data, steps=6, *extra):
    return load_config(None, [f"data.source={data}", "data.image_size=16", "model.patch_size=4",
                              "train.global_batch=8", "train.micro_batch=8", f"train.steps={steps}",
                              "logging.every_steps=1", "checkpoint.every_steps=2", "ema.warmup=true", *extra])


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_the_run(synthetic_shards, tmp_path):
    trainer = Trainer(config(synthetic_shards, 4, "logging.sample_every_steps=2", "logging.sample_steps=3"),
                      str(tmp_path))
    state = trainer.fit()
    acc = scalars(str(tmp_path))
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/clip", "train/skipped_steps",
                "perf/images_per_s", "perf/data_wait_share", "data/corrupt_images", "memory/ema_bytes_per_rank"):
        assert tag in tags, tag
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert losses == pytest.approx(list(state.history), rel=1e-6)
    assert acc.Tags()["images"] == ["samples/ema"] and len(acc.Images("samples/ema")) == 2
    text = acc.Tags()["tensors"]
    assert "run/config/text_summary" in text and "run/provenance/text_summary" in text
    assert os.path.exists(tmp_path / "config.yaml") and os.path.exists(tmp_path / "provenance.json")


def test_staged_lr_and_clip_switch_and_resume_in_the_right_stage(synthetic_shards, tmp_path):
    stages = "schedule.stages=[{start: 0, lr: 1e-3, clip: 1.0}, {start: 3, lr: 1e-4, clip: 0.05}]"
    Trainer(config(synthetic_shards, 6, stages), str(tmp_path / "a")).fit()
    acc = scalars(str(tmp_path / "a"))
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3] * 3 + [1e-4] * 3)
    assert [e.value for e in acc.Scalars("train/clip")] == pytest.approx([1.0] * 3 + [0.05] * 3)
    assert [e.value for e in acc.Scalars("train/stage")] == [0, 0, 0, 1, 1, 1]
    resumed = Trainer(config(synthetic_shards, 6, stages), str(tmp_path / "b"))
    resumed.fit(str(tmp_path / "a" / "checkpoints" / "step_00000004"))
    acc = scalars(str(tmp_path / "b"))
    assert [e.step for e in acc.Scalars("train/lr")] == [5, 6]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-4, 1e-4])


def test_warmup_ramps_the_first_stage():
    from pixeldit.platform.config import Stage
    from pixeldit.platform.schedule import StagedSchedule
    schedule = StagedSchedule([Stage(0, 1e-3, 1.0), Stage(2, 1e-5, 0.5)], unit="epoch", warmup_steps=4)
    assert [schedule.at(s, 0).lr for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert schedule.at(100, 2) == schedule.at(0, 2).__class__(1, 1e-5, 0.5)


def test_accumulation_and_activation_checkpointing_do_not_change_the_loss(synthetic_shards, tmp_path):
    reference = list(Trainer(config(synthetic_shards, 3), str(tmp_path / "ref")).fit().history)
    for i, extra in enumerate((["train.micro_batch=2"], ["train.activation_checkpointing=every"],
                               ["train.micro_batch=4", "train.activation_checkpointing=selective"])):
        history = list(Trainer(config(synthetic_shards, 3, *extra), str(tmp_path / str(i))).fit().history)
        assert history == pytest.approx(reference, rel=1e-5), extra


def test_non_finite_steps_are_skipped_then_the_run_stops(synthetic_shards, tmp_path):
    trainer = Trainer(config(synthetic_shards, 12, "logging.max_skipped_steps=3"), str(tmp_path))
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] in (2, 5, 6, 7) else output

    trainer.strategy.module.model.final_layer.register_forward_hook(poison)
    before = {k: v.clone() for k, v in trainer.strategy.module.state_dict().items()}
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss"):
        trainer.fit()
    assert trainer.state.skipped == 4 and trainer.state.updates == 3
    acc = scalars(str(tmp_path))
    assert [e.value for e in acc.Scalars("train/skipped_steps")][:2] == [0, 1]
    # the last checkpoint (step 6, inside the streak) is intact and loads
    again = Trainer(config(synthetic_shards, 12), str(tmp_path))
    assert again.resume() and again.state.step == 6 and again.state.skipped == 3
    assert any(not torch.equal(v, before[k]) for k, v in again.strategy.module.state_dict().items())


def test_export_round_trip(synthetic_shards, tmp_path):
    from safetensors import safe_open

    from pixeldit.platform.export import export_checkpoint, load_exported
    trainer = Trainer(config(synthetic_shards, 2), str(tmp_path))
    trainer.fit()
    out = str(tmp_path / "model.safetensors")
    meta = export_checkpoint(str(tmp_path), out)
    assert meta["step"] == "2"
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("model.") for k in keys)
    ema_model = load_exported(out)
    trained = load_exported(out, "model")
    for name, value in trainer.strategy.module.model.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value)
    shadow = {f.name[len("model."):]: s.view(f.shape) for f, s in zip(trainer.ema.fragments, trainer.ema.shadow)}
    for name, value in ema_model.state_dict().items():
        assert torch.equal(value, shadow[name])


def _training_subprocess(run_dir, data, steps, every):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pixeldit", "train", "--run-dir", run_dir,
                             "--set", f"data.source={data}", "--set", "data.image_size=16",
                             "--set", "model.patch_size=4", "--set", f"train.steps={steps}",
                             "--set", f"checkpoint.every_steps={every}", "--set", "logging.tensorboard=false",
                             # config()'s batch: the resume below refuses another global batch
                             "--set", "train.global_batch=8", "--set", "train.micro_batch=8"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(synthetic_shards, tmp_path):
    run = str(tmp_path / "run")
    proc = _training_subprocess(run, synthetic_shards, 400, 3)
    ckpts = os.path.join(run, "checkpoints")
    deadline = time.time() + 240
    killed_in = None
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(os.path.join(ckpts, "latest")):
                tmp = [d for d in os.listdir(ckpts) if d.endswith(".tmp")]
                if tmp:
                    proc.send_signal(signal.SIGKILL)
                    killed_in = tmp[0]
                    break
            time.sleep(0.0005)
    finally:
        proc.kill()
        proc.wait()
    assert killed_in, "never caught a save in progress"
    trainer = Trainer(config(synthetic_shards, 400), run)
    assert trainer.resume()
    assert trainer.state.step % 3 == 0 and f"step_{trainer.state.step:08d}.tmp" != killed_in
    assert trainer.state.step < int(killed_in[5:13])


def test_sigterm_saves_at_the_step_boundary_and_exits(synthetic_shards, tmp_path):
    run = str(tmp_path / "run")
    proc = _training_subprocess(run, synthetic_shards, 10_000, 1000)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(run, "provenance.json")):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop requested (SIGTERM)" in out
    trainer = Trainer(config(synthetic_shards, 10_000), run)
    assert trainer.resume() and 0 < trainer.state.step < 1000


def test_init_from_an_export_starts_from_its_ema_weights(synthetic_shards, tmp_path):
    from pixeldit.platform.export import export_checkpoint, load_exported
    Trainer(config(synthetic_shards, 2), str(tmp_path / "a")).fit()
    export_checkpoint(str(tmp_path / "a"), str(tmp_path / "a.safetensors"))
    tuned = Trainer(config(synthetic_shards, 2, f"train.init_from={tmp_path / 'a.safetensors'}"), str(tmp_path / "b"))
    source = load_exported(str(tmp_path / "a.safetensors"))
    for name, value in source.state_dict().items():
        assert torch.equal(tuned.strategy.module.model.state_dict()[name], value), name
    with pytest.raises(ValueError, match="repa.features is required"):
        config(synthetic_shards, 2, "repa.mode=cached", "repa.block=2")
