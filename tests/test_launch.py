"""Two "nodes" on loopback: two launcher invocations with one process each, training a tiny model."""

import json
import os
import subprocess
import sys

import pytest

from tests.dist import free_port


def _train_args(run_dir, data):
    return ["--run-dir", run_dir, "--set", f"data.source={data}", "--set", "data.image_size=16",
            "--set", "model.patch_size=4", "--set", "train.steps=2", "--set", "logging.tensorboard=false",
            "--set", "train.global_batch=8", "--set", "train.micro_batch=4", "--set", "distributed.strategy=fsdp"]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_on_loopback(launcher, synthetic_shards, tmp_path):
    run = str(tmp_path / "run")
    port = free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "pixeldit", "launch", launcher, "--nnodes", "2", "--node-rank", str(node),
               "--master-port", str(port)]
        if launcher == "deepspeed":
            cmd += ["--hostfile", str(hostfile), "--no-ssh"]
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


def test_slurm_script_and_printed_commands():
    out = subprocess.run([sys.executable, "-m", "pixeldit", "launch", "slurm", "--nnodes", "4", "--nproc-per-node",
                          "8", "--", "--config", "configs/imagenet256/pixeldit_xl.yaml"],
                         capture_output=True, text=True, check=True).stdout
    assert "#SBATCH --nodes=4" in out and "#SBATCH --gpus-per-node=8" in out and "--signal=TERM@300" in out
    assert "--rdzv-backend=c10d" in out and "-m pixeldit train --config configs/imagenet256/pixeldit_xl.yaml" in out
    out = subprocess.run([sys.executable, "-m", "pixeldit", "launch", "torchrun", "--nproc-per-node", "8",
                          "--print", "--", "--set", "train.steps=10"], capture_output=True, text=True, check=True)
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=8" in out.stdout
    assert out.stdout.strip().endswith("-m pixeldit train --set train.steps=10")
