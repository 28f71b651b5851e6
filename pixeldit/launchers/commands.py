"""Launch commands for torchrun, the deepspeed launcher and SLURM, built in one place.

Every launcher ends up running `python -m pixeldit train ...` once per process
with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; the
trainer reads those and nothing launcher-specific.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

# the environment every launch wants, in one place (docs/launch.md explains each)
RECOMMENDED_ENV = {
    "OMP_NUM_THREADS": "8",                      # per process; torchrun would otherwise set 1
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",      # a dead peer aborts collectives instead of hanging
    "TORCH_EXTENSIONS_DIR": "$HOME/.cache/torch_extensions",  # DeepSpeed's compiled ops, built once
    "NCCL_DEBUG": "WARN",
}


@dataclass
class Launch:
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    train_args: list[str] = field(default_factory=list)
    python: str = sys.executable

    def train_module(self) -> list[str]:
        return ["-m", "pixeldit", "train", *self.train_args]


def torchrun(launch: Launch, rendezvous: str = "static", job_id: str = "pixeldit") -> list[str]:
    """Single node, or multi-node with a static master (`static`) or elastic c10d rendezvous (`c10d`)."""
    cmd = [launch.python, "-m", "torch.distributed.run", f"--nnodes={launch.nnodes}",
           f"--nproc-per-node={launch.nproc_per_node}"]
    if rendezvous == "c10d":
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launch.master_addr}:{launch.master_port}",
                f"--rdzv-id={job_id}"]
    else:
        cmd += [f"--node-rank={launch.node_rank}", f"--master-addr={launch.master_addr}",
                f"--master-port={launch.master_port}"]
    return cmd + launch.train_module()


def hostfile_text(hosts: list[str], slots: int) -> str:
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def deepspeed(launch: Launch, hostfile: str | None = None, no_ssh: bool = False) -> list[str]:
    """`deepspeed --hostfile` (pdsh over ssh from node 0) or `--no_ssh --node_rank` (run on every node)."""
    cmd = [launch.python, "-m", "deepspeed.launcher.runner", f"--num_gpus={launch.nproc_per_node}",
           f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}",
           "--no_local_rank", "--module"]
    if hostfile:
        cmd += [f"--hostfile={hostfile}", f"--num_nodes={launch.nnodes}"]
    if no_ssh:
        cmd += ["--no_ssh", f"--node_rank={launch.node_rank}"]
    return cmd + ["pixeldit", "train", *launch.train_args]


def slurm_script(launch: Launch, job_name: str = "pixeldit", partition: str | None = None,
                 time_limit: str = "04:00:00", gpus_per_node: int | None = None) -> str:
    """An sbatch script: one torchrun per node via srun, c10d rendezvous on the first node.

    SLURM sends SIGTERM before the time limit (`--signal`); the trainer saves at the next step
    boundary and exits, and a requeued job resumes from `latest`.
    """
    gpus = gpus_per_node or launch.nproc_per_node
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={launch.nnodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus}", f"#SBATCH --time={time_limit}",
             "#SBATCH --signal=TERM@300", "#SBATCH --requeue", "#SBATCH --output=%x-%j.out"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["", "set -euo pipefail"]
    lines += [f"export {k}={v}" for k, v in RECOMMENDED_ENV.items()]
    lines += ['MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"MASTER_PORT={launch.master_port}", ""]
    train = " ".join(shlex.quote(a) for a in launch.train_module())
    lines.append(f"srun --kill-on-bad-exit=1 python -m torch.distributed.run --nnodes=$SLURM_NNODES "
                 f"--nproc-per-node={gpus} --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT "
                 f"--rdzv-id=$SLURM_JOB_ID {train}")
    return "\n".join(lines) + "\n"
