"""The training loop in one process: logging read back, schedules, guards, accumulation, AC, export."""

import logging
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
                "perf/images_per_s", "perf/data_wait_share", "data/skipped/undecodable", "memory/ema_bytes_per_rank"):
        assert tag in tags, tag
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert losses == pytest.approx(list(state.history), rel=1e-6)
    assert acc.Tags()["images"] == ["samples/ema"] and len(acc.Images("samples/ema")) == 2
    text = acc.Tags()["tensors"]
    assert "run/config/text_summary" in text and "run/provenance/text_summary" in text
    assert os.path.exists(tmp_path / "config.yaml") and os.path.exists(tmp_path / "provenance.json")

    # the run is complete: starting it again opens no writer, so no second (empty) event file appears
    events = sorted(os.listdir(tmp_path / "tensorboard"))
    again = Trainer(config(synthetic_shards, 4), str(tmp_path))
    assert again.fit().step == 4 and again.already_complete
    assert sorted(os.listdir(tmp_path / "tensorboard")) == events


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


# `pixeldit train` in a child whose EMA save of one step kills the process (SIGKILL, nothing cleans up):
# the engine of that step is written, the rest of its checkpoint is not
KILLED_IN_SAVE = """
import os, signal, sys
from pixeldit.parallel.ema import ShardedEMA
from pixeldit.cli import main

step = "step_%08d" % int(sys.argv[1])
save = ShardedEMA.save

def save_or_die(self, path, rank):
    if step in path:
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, path, rank)

ShardedEMA.save = save_or_die
sys.exit(main(sys.argv[2:]))
"""


def _training_subprocess(run_dir, data, steps, every, kill_in_save_of=None, strategy="ddp"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if strategy != "ddp":
        from tests.dist import free_port
        # FSDP2 and DeepSpeed need a process group: one rank, as torchrun would describe it
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    entry = ["-m", "pixeldit"] if kill_in_save_of is None else ["-c", KILLED_IN_SAVE, str(kill_in_save_of)]
    return subprocess.Popen([sys.executable, *entry, "train", "--run-dir", run_dir,
                             "--set", f"data.source={data}", "--set", "data.image_size=16",
                             "--set", "model.patch_size=4", "--set", f"train.steps={steps}",
                             "--set", f"checkpoint.every_steps={every}", "--set", "logging.tensorboard=false",
                             "--set", f"distributed.strategy={strategy}",
                             # config()'s batch: the resume below refuses another global batch
                             "--set", "train.global_batch=8", "--set", "train.micro_batch=8"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(synthetic_shards, tmp_path, strategy):
    run = str(tmp_path / "run")
    proc = _training_subprocess(run, synthetic_shards, 400, 3, kill_in_save_of=6, strategy=strategy)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, out
    ckpts = os.path.join(run, "checkpoints")
    killed_in = [d for d in os.listdir(ckpts) if d.endswith(".tmp")]
    assert killed_in == ["step_00000006.tmp"] and os.listdir(os.path.join(ckpts, killed_in[0], "engine"))
    # the same command, to one step past the kept checkpoint: it resumes from that checkpoint
    resumed = _training_subprocess(run, synthetic_shards, 4, 3, strategy=strategy)
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert f"resumed from {os.path.join(ckpts, 'step_00000003')} at step 3" in out, out


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


def test_console_banner_and_window_mean_lines(synthetic_shards, tmp_path, caplog):
    import re
    import warnings

    caplog.set_level(logging.INFO, logger="pixeldit.train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning reaches `caught` unless the trainer filters it
        trainer = Trainer(config(synthetic_shards, 6, "train.micro_batch=2", "logging.every_steps=3"), str(tmp_path))
        state = trainer.fit()
    banner = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("PixelDiT training:"))
    model = trainer.strategy.module.model
    assert banner.startswith("PixelDiT training: new run, 6 steps")
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters" in banner
    assert f"{synthetic_shards}: 230 samples in 6 shards, 16px" in banner
    assert "1 process on cpu, strategy ddp, fp32" in banner
    assert trainer.layout.describe() in banner and trainer.layout.accumulation == 4
    assert f"run dir     {tmp_path} (trackers: tensorboard)" in banner

    lines = [r.getMessage() for r in caplog.records if re.match(r"step \d+/6 ", r.getMessage())]
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]
    history = list(state.history)
    for line, window in zip(lines, (history[:3], history[3:])):
        assert f"loss {sum(window) / 3:.4f} (mean of 3)" in line
        assert re.search(r"elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$", line), line
    assert lines[-1].endswith("eta 0:00:00")
    acc = scalars(str(tmp_path))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([sum(history[:3]) / 3,
                                                                         sum(history[3:]) / 3], rel=1e-6)
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]

    caplog.clear()
    Trainer(config(synthetic_shards, 7, "train.micro_batch=2"), str(tmp_path)).fit()
    assert any(r.getMessage().startswith("PixelDiT training: resumed from step 6, 7 steps") for r in caplog.records)


def _train_command(run_dir, data, *overrides):
    """`pixeldit train` with config()'s settings, so an in-process Trainer can resume its run."""
    settings = [f"data.source={data}", "data.image_size=16", "model.patch_size=4", "train.global_batch=8",
                "train.micro_batch=8", "ema.warmup=true", "logging.tensorboard=false", *overrides]
    return [sys.executable, "-m", "pixeldit", "train", "--run-dir", run_dir,
            *[a for item in settings for a in ("--set", item)]]


def _render_terminal(raw: str) -> list[str]:
    """The lines a terminal would show for this output: \r returns to column 0 and later text
    overwrites earlier text; ESC[A moves up a line, ESC[K clears to the line end."""
    import re
    screen, row, col = {}, 0, 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|\r|\n|[^\x1b\r\n]", raw):
        line = screen.setdefault(row, [])
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
        elif token.startswith("\x1b"):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
            elif token.endswith("K"):
                del line[col:]
        else:
            line.extend(" " * (col + 1 - len(line)))
            line[col] = token
            col += 1
    return ["".join(screen[r]).rstrip() for r in sorted(screen)]


def test_ctrl_c_saves_at_the_step_boundary_exits_0_and_the_run_resumes(synthetic_shards, tmp_path, caplog):
    """A first Ctrl-C, delivered as a terminal does (SIGINT to the process group), on a terminal (a pty):
    the progress bar and the log lines share it without writing over each other."""
    import fcntl
    import pty
    import re
    import select
    import struct
    import termios

    run = str(tmp_path / "run")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_train_command(run, synthetic_shards, "train.steps=10000", "checkpoint.every_steps=1000",
                                           "logging.every_steps=3"),
                            env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    raw, interrupted_at = b"", None
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                raw += chunk
            if interrupted_at is None and b" step 6/10000 " in raw:
                os.killpg(proc.pid, signal.SIGINT)
                interrupted_at = time.time()
            if proc.poll() is not None and not ready:
                break
        proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    out = raw.decode(errors="replace")
    assert interrupted_at is not None, f"no log line for step 6 within the deadline:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    saved = int(re.search(r"stop requested \(SIGINT\): saved step (\d+) and exiting", out).group(1))
    assert f"stopped at step {saved} of 10000 on request (SIGINT)" in out
    assert 6 <= saved < 1000  # past the last log line, before any periodic checkpoint
    checkpoints = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["latest", f"step_{saved:08d}"]

    lines = _render_terminal(out)
    assert any(re.match(r"train: +\d+%\|", line) for line in lines), "no progress bar on the terminal"
    logged = [line for line in lines if "pixeldit.train INFO step " in line]
    assert len(logged) >= 2
    for line in logged:
        # each log line alone on its screen line: neither bar remnants in front nor behind
        assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ pixeldit\.train INFO step \d+/10000  loss [\d.]+ \(mean of 3\)"
                            r"  .*  elapsed \d+:\d\d:\d\d  eta [\dd :]+", line), line

    caplog.set_level(logging.INFO, logger="pixeldit.train")
    resumed = Trainer(config(synthetic_shards, saved + 1, "logging.tensorboard=false"), run)
    assert resumed.fit().step == saved + 1
    assert f"PixelDiT training: resumed from step {saved}," in caplog.text


# `pixeldit train` whose Trainer presses Ctrl-C itself at a chosen point: real signals, delivered to the
# process at a known moment rather than raced against a step from outside
_CTRL_C_AT = """
import logging, os, signal, sys, threading, time
from pixeldit.cli import main
from pixeldit.platform.trainer import Trainer

real = Trainer.train_step
announced = threading.Event()


class Announcement(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Ctrl-C: saving after step"):
            announced.set()


def train_step(self, batch):
    if self.state.step == 1:
        # after the console's handler (the root's, added by the CLI): set once the line is on the console
        logging.getLogger().addHandler(Announcement())
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the step in flight finishes, then a save
        # as a user would, the second comes once the first was announced (the stop handler logs from a thread)
        assert announced.wait(30), "the first Ctrl-C was not announced within 30 s"
        assert self.stop_requested
        print("a stop is pending", flush=True)  # so the first Ctrl-C did not abort by itself
        os.kill(os.getpid(), signal.SIGINT)  # the second, while that step is still in flight
        time.sleep(30)
        print("the second Ctrl-C did not interrupt the step", flush=True)
    return real(self, batch)


Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_aborts_at_once_without_saving(synthetic_shards, tmp_path):
    run = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = _train_command(run, synthetic_shards, "train.steps=10000", "checkpoint.every_steps=1000")[3:]
    proc = subprocess.Popen([sys.executable, "-c", _CTRL_C_AT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "a stop is pending" in out, out[-3000:]
    assert "did not interrupt" not in out and proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and out.rstrip().endswith(
        "pixeldit train: aborted (Ctrl-C): nothing saved since the last checkpoint"), out[-3000:]
    assert not os.path.exists(os.path.join(run, "checkpoints"))  # not even a save begun


def test_a_ctrl_c_while_the_checkpoint_loads_aborts_without_training_or_saving(synthetic_shards, tmp_path):
    run = str(tmp_path)
    Trainer(config(synthetic_shards, 2, "logging.tensorboard=false"), run).fit()
    checkpoints = sorted(os.listdir(os.path.join(run, "checkpoints")))
    trainer = Trainer(config(synthetic_shards, 4), run)
    resume = trainer.resume

    def resume_then_ctrl_c(path=None):
        resumed = resume(path)
        # the user's Ctrl-C, arriving while the checkpoint loads: Python's own handler must still be the
        # one in force, and it is run here directly (a signal sent with os.kill is handled at a moment
        # of the interpreter's choosing, possibly inside a finalizer, which swallows the exception)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.default_int_handler(signal.SIGINT, None)
        return resumed
    trainer.resume = resume_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.step == 2 and not trainer.state.history  # no step trained
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == checkpoints  # nothing saved
    assert not os.path.exists(os.path.join(run, "tensorboard"))  # no tracker opened for a run that did not start
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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
    from pixeldit.errors import WeightsError
    with pytest.raises(WeightsError, match=r"^train\.init_from=.*a\.safetensors: does not match the model of this "
                                           r"config \(\d+ tensors of another shape, e\.g\. \['[\w.]+ \(128"):
        Trainer(config(synthetic_shards, 2, "model.hidden_size=64", f"train.init_from={tmp_path / 'a.safetensors'}"),
                str(tmp_path / "c"))


def test_version_flag_prints_the_installed_version(capsys):
    from importlib import metadata

    from pixeldit.cli import main
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"pixeldit {metadata.version('pixeldit')}\n"
