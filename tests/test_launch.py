"""Launch: two "nodes" on loopback (two launcher invocations with one process each, training a tiny
model), the checks `pixeldit launch` makes before it prints or starts anything, the deepspeed
hostfile rules, and the SLURM script run by bash with fake `srun` / `scancel` / `scontrol`."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from pixeldit.cli import main
from pixeldit.errors import PixelDiTError
from pixeldit.launchers import SHUTDOWN_TIMEOUT_S, SIGNAL_LEAD_S, Launch, resolve_launch, slurm_script
from tests.dist import free_port

XL = "configs/imagenet256/pixeldit_xl.yaml"


def _train_args(run_dir, data):
    return ["--run-dir", run_dir, "--set", f"data.source={data}", "--set", "data.image_size=16",
            "--set", "model.patch_size=4", "--set", "train.steps=2", "--set", "logging.tensorboard=false",
            "--set", "distributed.strategy=fsdp"]  # the demo's batch: 16, micro_batch auto (8 per rank on 2)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_on_loopback(launcher, synthetic_shards, tmp_path):
    run = str(tmp_path / "run")
    port = free_port()
    hostfile = tmp_path / "hostfile"
    # the master address comes from the hostfile's first host (no --master-addr below)
    hostfile.write_text("# two loopback nodes\n127.0.0.1 slots=1\n\nlocalhost slots=1\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "pixeldit", "launch", launcher, "--nnodes", "2", "--node-rank", str(node),
               "--master-port", str(port)]
        if launcher == "deepspeed":
            cmd += ["--hostfile", str(hostfile), "--no-ssh"]
        else:
            cmd += ["--master-addr", "127.0.0.1"]  # a multi-node torchrun has no default master
        procs.append(subprocess.Popen(cmd + ["--", *_train_args(run, synthetic_shards)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(o[-3000:] for o in outputs)
    meta = json.loads(open(os.path.join(run, "checkpoints", "step_00000002", "meta.json")).read())
    assert meta["world"] == 2 and meta["strategy"] == "fsdp"
    assert os.path.exists(os.path.join(run, "checkpoints", "step_00000002", "rank_00001.pt"))


def test_ctrl_c_under_launch_saves_on_every_rank_and_exits_0(synthetic_shards, tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to `pixeldit launch`'s process group) on 2 processes: the ranks
    save at the next step boundary, torchrun re-raises the signal and exits 1, and launch, seeing a complete
    checkpoint newer than the one at the Ctrl-C, exits 0 with one line. --debug reaches the ranks."""
    import queue
    import threading

    run = str(tmp_path / "run")
    args = _train_args(run, synthetic_shards)
    args[args.index("train.steps=2")] = "train.steps=100000"
    args += ["--set", "checkpoint.every_steps=1000", "--set", "logging.every_steps=1"]
    env = {k: v for k, v in os.environ.items() if k != "PIXELDIT_DEBUG"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pixeldit", "launch", "torchrun", "--debug", "--nproc-per-node",
                             "2", "--master-port", str(free_port()), "--", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    out, ranks_env = [], []
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None or not lines.empty():
            assert time.monotonic() < deadline, "".join(out)[-3000:]
            try:
                out.append(lines.get(timeout=0.5))
            except queue.Empty:
                continue
            if not ranks_env and " step 1/100000 " in out[-1]:
                ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                         if p.cmdline()[-len(args):] == args and "torch.distributed.run" not in p.cmdline()]
                ranks_env = [p.environ().get("PIXELDIT_DEBUG") for p in ranks]
                os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "".join(out)
    assert ranks_env == ["1", "1"], (ranks_env, text[-3000:])
    assert proc.returncode == 0, text[-3000:]
    step = _latest(run)
    assert step is not None and step < 1000  # the stop's save, not a periodic one
    meta = json.load(open(os.path.join(run, "checkpoints", f"step_{step:08d}", "meta.json")))
    assert meta["world"] == 2 and meta["step"] == step
    stopped = [line for line in out if line.startswith("pixeldit launch: stopped")]
    assert stopped == [f"pixeldit launch: stopped on Ctrl-C at step {step}, every rank saved; the same command "
                       f"resumes from it\n"], text[-3000:]


def test_slurm_script_and_printed_commands():
    out = subprocess.run([sys.executable, "-m", "pixeldit", "launch", "slurm", "--nnodes", "4", "--nproc-per-node",
                          "8", "--", "--config", XL], capture_output=True, text=True, check=True).stdout
    assert "#SBATCH --nodes=4" in out and "#SBATCH --gpus-per-node=8" in out
    assert f"#SBATCH --signal=B:USR1@{SIGNAL_LEAD_S}" in out and "#SBATCH --requeue" in out
    assert f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}" in out and SHUTDOWN_TIMEOUT_S < SIGNAL_LEAD_S
    assert "--rdzv-backend=c10d" in out and f"-m pixeldit train --config {XL}" in out
    out = subprocess.run([sys.executable, "-m", "pixeldit", "launch", "torchrun", "--nproc-per-node", "8",
                          "--print", "--", "--set", "train.steps=10"], capture_output=True, text=True, check=True)
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=8" in out.stdout
    assert "--master-addr=127.0.0.1" in out.stdout  # one node: loopback
    assert out.stdout.strip().endswith("-m pixeldit train --set train.steps=10")


# ---------------------------------------------------------------- checks before anything starts

def _launch(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_launch_refuses_a_batch_the_ranks_cannot_share_before_printing(capsys):
    code, out, err = _launch(capsys, "launch", "slurm", "--nnodes", "6", "--nproc-per-node", "8", "--", "--config", XL)
    assert code == 2 and out == ""  # no script to submit
    assert err == ("pixeldit launch: error: train.global_batch=256 over 48 ranks (6 nodes x 8 processes): the ranks "
                   "must share it evenly; use 4 or 8 nodes of 8, or set train.global_batch=288\n")
    # the same config, the suggested layout and the --set overrides after `--` are what is checked
    code, out, _ = _launch(capsys, "launch", "slurm", "--nnodes", "4", "--nproc-per-node", "8", "--", "--config", XL)
    assert code == 0 and out.startswith("#!/bin/bash")
    code, out, err = _launch(capsys, "launch", "torchrun", "--nproc-per-node", "8", "--print", "--", "--config", XL,
                             "--set", "train.global_batch=100")
    assert code == 2 and out == "" and "train.global_batch=100 over 8 ranks" in err
    code, out, err = _launch(capsys, "launch", "torchrun", "--print", "--", "--set", "optim.lrr=1")
    assert code == 2 and out == ""
    assert "--set optim.lrr=1: unknown key optim.lrr (did you mean schedule.stages[0].lr?)" in err


def test_the_demo_launches_on_two_processes(capsys):
    code, out, _ = _launch(capsys, "launch", "torchrun", "--nproc-per-node", "2", "--print")
    assert code == 0 and "--nproc-per-node=2" in out


def test_a_forgotten_double_dash_gets_a_hint(capsys):
    code, out, err = _launch(capsys, "launch", "torchrun", "--nproc-per-node", "2", "--config", "x.yaml")
    assert code == 2 and out == ""
    assert err.strip() == ("pixeldit launch: error: unrecognized arguments: --config x.yaml; put the train arguments "
                           "after `--`: pixeldit launch torchrun --nproc-per-node 2 -- --config x.yaml")


def test_the_double_dash_hint_keeps_the_launchers_own_arguments_in_place(capsys):
    # "2" is both the launcher's --nnodes value and a train value: the hint goes by position, not text
    code, out, err = _launch(capsys, "launch", "torchrun", "--nnodes", "2", "--master-addr", "h", "--debug",
                             "--set", "train.steps=2", "--nproc-per-node", "2")
    assert code == 2 and out == ""
    # --debug is the launcher's own option too (it passes it on), so it stays before `--`
    assert err.strip().endswith("put the train arguments after `--`: pixeldit launch torchrun --nnodes 2 "
                                "--master-addr h --debug --nproc-per-node 2 -- --set train.steps=2"), err
    code, out, err = _launch(capsys, "launch", "torchrun", "--workers", "2", "--nproc-per-node", "2")
    assert err.strip().endswith("pixeldit launch torchrun --nproc-per-node 2 -- --workers 2"), err


def test_launch_debug_reaches_every_rank_and_works_after_any_verb(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("PIXELDIT_DEBUG", raising=False)
    for argv in (["--debug", "launch"], ["launch", "--debug"]):
        code, out, _ = _launch(capsys, *argv, "torchrun", "--print", "--", "--config", XL)
        assert code == 0 and f"-m pixeldit train --debug --config {XL}" in out, out
    # after the verb it shows the traceback (the error propagates) instead of the one line
    with pytest.raises(PixelDiTError):
        main(["export", "--debug", str(tmp_path / "missing"), str(tmp_path / "out.safetensors")])
    with pytest.raises(PixelDiTError):
        main(["config", "--debug", "--set", "model.patch_size=5"])
    code, _, err = _launch(capsys, "config", "--set", "model.patch_size=5")
    assert code == 2 and err.startswith("pixeldit config: error: --set model.patch_size=5:")


def test_multi_node_torchrun_needs_a_master_address(capsys):
    code, out, err = _launch(capsys, "launch", "torchrun", "--nnodes", "2", "--print")
    assert code == 2 and out == "" and "torchrun --nnodes 2: give --master-addr" in err


# ---------------------------------------------------------------- deepspeed hostfiles

HOSTFILE = textwrap.dedent("""\
    # four nodes of eight GPUs
    gpu-a slots=8

    gpu-b slots=8   # rack 2
    gpu-c slots=8
    gpu-d slots=8
""")


def test_deepspeed_multi_host_command_takes_the_master_from_the_hostfile(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    code, out, err = _launch(capsys, "launch", "deepspeed", "--hostfile", str(hostfile), "--print", "--",
                             "--config", XL, "--set", "distributed.strategy=zero2")
    assert code == 0, err
    cmd = out.split()
    # nodes and processes default to the hostfile's; the master is its first host, never loopback
    assert "--master_addr=gpu-a" in cmd and "--num_nodes=4" in cmd and "--num_gpus=8" in cmd
    assert f"--hostfile={hostfile}" in cmd and not any("127.0.0.1" in c for c in cmd)
    code, out, _ = _launch(capsys, "launch", "deepspeed", "--hostfile", str(hostfile), "--master-addr", "10.0.0.5",
                           "--print", "--", "--config", XL)
    assert code == 0 and "--master_addr=10.0.0.5" in out.split()


@pytest.mark.parametrize("text, options, message", [
    (HOSTFILE, ["--nnodes", "5"], "--nnodes 5: {hostfile} lists 4 host(s)"),
    (HOSTFILE, ["--nproc-per-node", "16"], "--nproc-per-node 16: {hostfile} gives gpu-a slots=8, gpu-b slots=8"),
    ("a slots=8\nb slots=4\n", [], "{hostfile}: the hosts have different slots (a slots=8, b slots=4); give "
                                    "--nproc-per-node"),
    ("a slots=8\na slots=8\n", [], "{hostfile}:2: a is listed twice"),
    ("a 8\n", [], "{hostfile}:1: 'a 8' is not a hostfile entry; write 'HOST slots=N'"),
    ("# nothing\n\n", [], "{hostfile}: no hosts"),
    # 3 nodes x 8 = 24 ranks cannot share the XL batch of 256
    (HOSTFILE, ["--nnodes", "3"], "train.global_batch=256 over 24 ranks (3 nodes x 8 processes)"),
])
def test_deepspeed_hostfile_is_checked_against_nodes_and_processes(tmp_path, capsys, text, options, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    code, out, err = _launch(capsys, "launch", "deepspeed", "--hostfile", str(hostfile), *options, "--print", "--",
                             "--config", XL)
    assert code == 2 and out == ""
    assert err.startswith("pixeldit launch: error: " + message.format(hostfile=hostfile)), err


def test_plan_uses_the_first_hosts_of_a_longer_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    launch = resolve_launch("deepspeed", nnodes=2, hostfile=str(hostfile))
    assert (launch.nnodes, launch.nproc_per_node, launch.master_addr, launch.world) == (2, 8, "gpu-a", 16)
    assert resolve_launch("torchrun").master_addr == "127.0.0.1"


def test_a_hostfile_that_is_a_folder_is_one_line(tmp_path, capsys):
    # (an unreadable file takes the same path, PermissionError; as root, as tests run here, none is unreadable)
    code, out, err = _launch(capsys, "launch", "deepspeed", "--hostfile", str(tmp_path), "--print")
    assert code == 2 and out == "" and err.startswith(f"pixeldit launch: error: --hostfile {tmp_path} is a folder")


# ---------------------------------------------------------------- the SLURM script, run by bash

# srun as SLURM's srun behaves where it matters (src/srun srun_job.c, its signal thread): it stays the
# parent of its tasks, answers a SIGTERM / SIGHUP / SIGQUIT of its own with SIGKILL to every task
# ("forcing job termination") and passes other signals (USR1, ...) on. step.pid is the task's pid.
FAKE_SRUN = """#!/bin/bash
exec "$FAKE_PYTHON" -c '
import os, signal, subprocess, sys, psutil
args = sys.argv[1:]
while args and args[0].startswith("--"):  # srun options end where the command begins
    args.pop(0)
task = subprocess.Popen(args)
pid_file = os.environ["FAKE_SLURM"] + "/step.pid"
open(pid_file + ".tmp", "w").write(str(task.pid))
os.replace(pid_file + ".tmp", pid_file)
def forward(signum, frame):
    kill = signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    if kill:
        print("srun: forcing job termination", file=sys.stderr, flush=True)
    try:
        processes = [psutil.Process(task.pid), *psutil.Process(task.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in processes:
        try:
            p.send_signal(signal.SIGKILL if kill else signum)
        except psutil.NoSuchProcess:
            pass
for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"):
    signal.signal(getattr(signal, name), forward)
code = task.wait()
sys.exit(128 - code if code < 0 else code)
' "$@"
"""
# `scancel --signal=SIG` (no --batch / --full) signals every process of the job's steps, but not the
# batch step: neither the job script nor srun; here, the task's process tree
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_SLURM/calls"
exec "$FAKE_PYTHON" -c '
import os, signal, sys, psutil
name = [a for a in sys.argv[1:] if a.startswith("--signal=")][0].split("=")[1]
task = psutil.Process(int(open(os.environ["FAKE_SLURM"] + "/step.pid").read()))
for p in [task, *task.children(recursive=True)]:
    p.send_signal(getattr(signal, "SIG" + name))
' "$@"
"""
# `scontrol show job` reports PreemptTime once SLURM has chosen the job for preemption
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM/calls"
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi
if [ "$1 $2" = "show job" ]; then
    if [ -e "$FAKE_SLURM/preempted" ]; then when=2026-12-01T03:00:00; else when=None; fi
    echo "JobId=$3 JobState=RUNNING PreemptEligibleTime=2026-12-01T02:00:00 PreemptTime=$when"
fi
"""
# stands in for torchrun: on SIGTERM it "saves" (which takes a moment, as a real save does) and exits 1,
# as torchrun does after a stop signal
FAKE_TORCHRUN = """
import os, signal, sys, time
def stop(signum, frame):
    time.sleep(float(os.environ.get("FAKE_SAVE_S", "1")))
    open(os.environ["FAKE_SLURM"] + "/saved", "w").write("saved")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
open(os.environ["FAKE_SLURM"] + "/running", "w").write("")
time.sleep(float(os.environ.get("FAKE_RUN_S", "60")))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def _fake_slurm(tmp_path, python_shim: bool):
    fake = tmp_path / "fake_slurm"
    (fake / "bin").mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (fake / "bin" / name).write_text(text)
        (fake / "bin" / name).chmod(0o755)
    if python_shim:  # `python -m torch.distributed.run ...` in the script runs the stand-in
        (fake / "torchrun.py").write_text(FAKE_TORCHRUN)
        (fake / "bin" / "python").write_text(f'#!/bin/bash\nexec "{sys.executable}" "{fake}/torchrun.py"\n')
        (fake / "bin" / "python").chmod(0o755)
    env = dict(os.environ, FAKE_SLURM=str(fake), FAKE_PYTHON=sys.executable, SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node[0-3]", SLURM_NNODES="1", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(fake / "bin"), os.path.dirname(sys.executable), os.environ["PATH"]]))
    return fake, env


def _wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, f"the job script ended before {path} appeared: {process.communicate()[0]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


def _calls(fake):
    return (fake / "calls").read_text().splitlines() if (fake / "calls").exists() else []


@pytest.mark.parametrize("event", ["time-limit", "preemption"])
def test_slurm_script_stops_saves_and_requeues(tmp_path, event):
    fake, env = _fake_slurm(tmp_path, python_shim=True)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(Launch(nnodes=1, nproc_per_node=1, train_args=["--config", XL])))
    job = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        _wait_for(fake / "running", job)
        _wait_for(fake / "step.pid", job)
        if event == "time-limit":  # sbatch --signal=B:USR1: the warning goes to the batch shell only
            job.send_signal(signal.SIGUSR1)
        else:  # a GraceTime preemption: SIGCONT + SIGTERM to the steps' processes, not the batch step's
            (fake / "preempted").write_text("")
            task = psutil.Process(int((fake / "step.pid").read_text()))
            for process in [task, *task.children(recursive=True)]:
                process.send_signal(signal.SIGTERM)
        out = job.communicate(timeout=60)[0]
    finally:
        job.kill()
    assert (fake / "saved").exists(), out  # srun never saw a SIGTERM, so the save was not cut short
    assert "forcing job termination" not in out, out
    assert job.returncode == 0, out  # torchrun's exit 1 after the stop is not a failure of the job
    calls = [c for c in _calls(fake) if not c.startswith("scontrol show")]
    if event == "time-limit":
        # the step, not srun, got the TERM (srun would SIGKILL its tasks), then the job requeued itself
        assert calls == ["scancel --signal=TERM 4242", "scontrol requeue 4242"], calls
        assert "requeueing job 4242" in out
    else:
        assert calls == ["scontrol requeue 4242"], calls
        assert "preempted: the trainers saved and stopped" in out


def test_slurm_script_survives_a_sigterm_that_srun_turns_into_sigkill(tmp_path):
    """scancel, or the end of a grace time: every process of the job gets SIGTERM, srun too, and srun kills
    the trainers before they can save. The script waits for the step, says so and exits 0."""
    fake, env = _fake_slurm(tmp_path, python_shim=True)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(Launch(nnodes=1, nproc_per_node=1)))
    job = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        _wait_for(fake / "running", job)
        _wait_for(fake / "step.pid", job)
        srun = next(p for p in psutil.Process(job.pid).children() if p.pid != job.pid)
        for process in (job, srun):
            process.send_signal(signal.SIGTERM)
        out = job.communicate(timeout=60)[0]
    finally:
        job.kill()
    assert "srun: forcing job termination" in out and not (fake / "saved").exists(), out
    assert job.returncode == 0 and "srun killed the trainers" in out, out
    assert not any("requeue" in c for c in _calls(fake))


@pytest.mark.parametrize("code", [0, 3])
def test_slurm_script_passes_on_the_status_of_a_run_that_was_not_stopped(tmp_path, code):
    fake, env = _fake_slurm(tmp_path, python_shim=True)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(Launch(nnodes=1, nproc_per_node=1)))
    env.update(FAKE_RUN_S="0.2", FAKE_EXIT=str(code))
    job = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert job.returncode == code, job.stdout + job.stderr
    assert not any("requeue" in c or "scancel" in c for c in _calls(fake))


def _checkpoints(run):
    root = os.path.join(run, "checkpoints")
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp"))
    return {int(n[5:]): json.load(open(os.path.join(root, n, "meta.json")))["saved_at"] for n in names
            if os.path.exists(os.path.join(root, n, "meta.json"))}


def _latest(run):
    path = os.path.join(run, "checkpoints", "latest")
    return int(open(path).read().strip()[5:]) if os.path.exists(path) else None


def test_slurm_job_saves_at_the_time_limit_requeues_and_resumes(tmp_path, synthetic_shards):
    """The real trainer under real torchrun: the time-limit warning makes it save and the job requeue
    itself; the requeued start of the same script resumes from that checkpoint instead of starting over."""
    fake, env = _fake_slurm(tmp_path, python_shim=False)
    run = str(tmp_path / "run")
    args = _train_args(run, synthetic_shards)
    args[args.index("train.steps=2")] = "train.steps=100000"
    args[args.index("distributed.strategy=fsdp")] = "distributed.strategy=ddp"
    args += ["--set", "checkpoint.every_steps=1", "--set", "checkpoint.keep_last=1000"]
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(Launch(nnodes=1, nproc_per_node=1, master_port=free_port(), train_args=args)))
    stopped_at = []
    for start in range(2):
        before = _latest(run)
        job = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while _latest(run) == before:  # training runs (a new checkpoint) before the warning comes
                assert job.poll() is None, job.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.2)
            job.send_signal(signal.SIGUSR1)
            out = job.communicate(timeout=180)[0]
        finally:
            job.kill()
        assert job.returncode == 0, out[-3000:]
        assert _calls(fake)[-1] == "scontrol requeue 4242", out[-3000:]
        stopped_at.append((_latest(run), _checkpoints(run)))
    (first, saved_first), (second, saved_second) = stopped_at
    assert second > first
    # the requeued start went on from the first start's last checkpoint: nothing up to it was redone
    assert {step: saved_second[step] for step in saved_first} == saved_first
