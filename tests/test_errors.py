"""The one error policy: a user's mistake is one line naming the problem and the fix; a bug keeps its traceback."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from pixeldit.cli import main
from pixeldit.errors import ConfigError, DataError, MissingFileError, PixelDiTError, WeightsError


def run_cli(*args, env=None, cwd=None):
    inherited = {k: v for k, v in os.environ.items() if k != "PIXELDIT_DEBUG"}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pixeldit", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=300)


def closed_port() -> int:
    """A loopback port nobody listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_project_errors_keep_the_builtin_they_replaced():
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(ConfigError, ValueError)
    assert issubclass(DataError, ValueError) and issubclass(WeightsError, KeyError)
    # the message as written: no KeyError quotes, no errno prefix
    assert str(WeightsError("model.ckpt: missing x")) == "model.ckpt: missing x"
    assert str(MissingFileError("run/: no checkpoint")) == "run/: no checkpoint"


def test_user_error_is_one_line_and_the_traceback_is_behind_debug(tmp_path):
    missing = str(tmp_path / "no_run")
    plain = run_cli("export", missing, str(tmp_path / "x.safetensors"))
    assert plain.returncode == 2
    lines = plain.stderr.strip().splitlines()
    assert lines == [f"pixeldit export: error: {missing}: no checkpoint "
                     f"(expected a run directory or checkpoints/step_NNNNNNNN)"], plain.stderr
    for debug in (run_cli("--debug", "export", missing, "x.safetensors"),
                  run_cli("export", missing, "x.safetensors", env={"PIXELDIT_DEBUG": "1"})):
        assert debug.returncode != 0
        assert "Traceback (most recent call last)" in debug.stderr
        assert "pixeldit.errors.MissingFileError" in debug.stderr


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    import pixeldit.platform.export as export

    def broken(path, out):
        return {}["step"]  # a programming error, not the user's: it must not be reworded into one line

    monkeypatch.setattr(export, "export_checkpoint", broken)
    with pytest.raises(KeyError) as caught:
        main(["export", str(tmp_path), str(tmp_path / "x.safetensors")])
    assert not isinstance(caught.value, PixelDiTError)


def test_unreachable_inception_url_is_one_line(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images)
    url = f"http://127.0.0.1:{closed_port()}/pt_inception-2015-12-05-6726825d.pth"
    result = run_cli("evaluate", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "samples.npz"),
                     "--inception", url, env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pixeldit evaluate: error: {url}: could not fetch"), result.stderr
    assert "--inception PATH" in lines[0]


def test_torchrun_summary_shows_each_failing_ranks_line(tmp_path):
    """torchrun prints its failure summary last: it must carry our line, not a traceback."""
    missing = str(tmp_path / "no_run")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pixeldit",
                             "export", missing, str(tmp_path / "x.safetensors")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    summary = result.stderr[result.stderr.rindex("Root Cause"):]
    assert f"pixeldit export (rank " in summary and f"error: {missing}: no checkpoint" in summary, summary
    assert "Traceback" not in summary


def test_error_file_layout_is_torchelastics(tmp_path, monkeypatch, capsys):
    """The file torchrun reads: a message and a timestamp, no py_callstack (so the message is shown)."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("PIXELDIT_DEBUG", raising=False)
    assert main(["export", str(tmp_path / "none"), "x.safetensors"]) == 2
    data = json.loads(error_file.read_text())["message"]
    assert data["message"].startswith("pixeldit export (rank 3): error: ") and "py_callstack" not in data["extraInfo"]
    assert int(data["extraInfo"]["timestamp"]) > 0
    assert capsys.readouterr().err.strip() == data["message"]
