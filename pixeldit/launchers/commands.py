"""Launch commands for torchrun, the deepspeed launcher and SLURM, built in one place.

Every launcher ends up running `python -m pixeldit train ...` once per process
with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; the
trainer reads those and nothing launcher-specific.

`resolve_launch` fills in what the user left out (nodes and processes from a hostfile, the
master address) and refuses a layout that cannot start; `pixeldit launch` runs it,
and checks the config's batch against the world size, before printing or starting
anything.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field

from ..errors import LaunchError

# the environment every launch wants, in one place (docs/training.md explains each)
RECOMMENDED_ENV = {
    "OMP_NUM_THREADS": "8",                      # per process; torchrun would otherwise set 1
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",      # a dead peer aborts collectives instead of hanging
    "TORCH_EXTENSIONS_DIR": "$HOME/.cache/torch_extensions",  # DeepSpeed's compiled ops, built once
    "NCCL_DEBUG": "WARN",
}

# SLURM warns the job this long before its time limit (sbatch --signal); the trainers then finish
# their step, save and exit, and the job requeues itself.
SIGNAL_LEAD_S = 300
# How long torchrun waits for its workers after a stop signal before it SIGKILLs them (torch's
# default, 30 s, cuts an XL save short). A save writes ~13 GB per replica (fp32 weights, AdamW
# moments, EMA); 240 s covers it at ~60 MB/s, the step in flight, and leaves 60 s of the lead for
# the requeue.
SHUTDOWN_TIMEOUT_S = SIGNAL_LEAD_S - 60


@dataclass
class Launch:
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    # None: from the hostfile's first host (deepspeed), else 127.0.0.1 for a single node
    master_addr: str | None = None
    master_port: int = 29500
    train_args: list[str] = field(default_factory=list)
    python: str = sys.executable

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc_per_node

    def train_module(self) -> list[str]:
        return ["-m", "pixeldit", "train", *self.train_args]


def read_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed's hostfile: `host slots=N` per line, `#` comments and blank lines ignored, in order."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise LaunchError(f"hostfile not found: {path} (one line per node: 'node0 slots=8')") from None
    except IsADirectoryError:
        raise LaunchError(f"--hostfile {path} is a folder; give the hostfile (one line per node: "
                          f"'node0 slots=8')") from None
    except PermissionError:
        raise LaunchError(f"--hostfile {path} cannot be read (permission denied); make it readable "
                          f"(chmod u+r) or give another hostfile") from None
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"(\S+)\s+slots=(\d+)\b", line)
        if not match:
            raise LaunchError(f"{path}:{number}: {line!r} is not a hostfile entry; write 'HOST slots=N'")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise LaunchError(f"{path}:{number}: {host} is listed twice; list each node once")
        if slots < 1:
            raise LaunchError(f"{path}:{number}: {host} slots={slots}; give it at least one slot")
        hosts[host] = slots
    if not hosts:
        raise LaunchError(f"{path}: no hosts; write one line per node: 'node0 slots=8'")
    return hosts


def resolve_launch(launcher: str, *, nnodes: int | None = None, nproc_per_node: int | None = None, node_rank: int = 0,
         master_addr: str | None = None, master_port: int = 29500, hostfile: str | None = None,
         train_args: list[str] | None = None) -> Launch:
    """A complete Launch from what the user gave: hostfile defaults and checks, the master address.

    The master address is `master_addr` if given, else the first host of a deepspeed hostfile, else
    127.0.0.1 for a single node; a multi-node torchrun without it is refused (there is no safe guess).
    """
    for flag, value in (("--nnodes", nnodes), ("--nproc-per-node", nproc_per_node)):
        if value is not None and value < 1:
            raise LaunchError(f"{flag} {value}: must be at least 1")
    if hostfile and launcher == "deepspeed":
        hosts = read_hostfile(hostfile)
        nnodes = len(hosts) if nnodes is None else nnodes
        if nnodes > len(hosts):
            raise LaunchError(f"--nnodes {nnodes}: {hostfile} lists {len(hosts)} host(s); add one line per node "
                              f"or lower --nnodes")
        used = list(hosts.items())[:nnodes]
        if nproc_per_node is None:
            if len({slots for _, slots in used}) > 1:
                raise LaunchError(f"{hostfile}: the hosts have different slots "
                                  f"({', '.join(f'{h} slots={s}' for h, s in used)}); give --nproc-per-node")
            nproc_per_node = used[0][1]
        short = [f"{h} slots={s}" for h, s in used if s < nproc_per_node]
        if short:
            raise LaunchError(f"--nproc-per-node {nproc_per_node}: {hostfile} gives {', '.join(short)}; raise "
                              f"the slots or lower --nproc-per-node")
        master_addr = master_addr or used[0][0]
    elif hostfile:
        raise LaunchError(f"--hostfile is for the deepspeed launcher; {launcher} takes --nnodes and --master-addr")
    nnodes, nproc_per_node = nnodes or 1, nproc_per_node or 1
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank {node_rank}: must be in 0..{nnodes - 1} for --nnodes {nnodes}")
    if master_addr is None:
        if nnodes > 1 and launcher == "torchrun":
            raise LaunchError(f"torchrun --nnodes {nnodes}: give --master-addr, the address of node 0 that every "
                              f"node can reach (the same on every node)")
        if nnodes > 1 and launcher == "deepspeed":
            raise LaunchError(f"deepspeed --nnodes {nnodes}: give --hostfile (one 'host slots=N' line per node)")
        master_addr = "127.0.0.1"  # a single node (SLURM finds its master in the allocation)
    return Launch(nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=node_rank, master_addr=master_addr,
                  master_port=master_port, train_args=list(train_args or []))


def _torchrun_options() -> list[str]:
    return [f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc): torchrun's workers."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # it ended while we looked
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the parenthesised name
            children.append(int(entry))
    return children


def torchrun(launch: Launch, rendezvous: str = "static", job_id: str = "pixeldit") -> list[str]:
    """Single node, or multi-node with a static master (`static`) or elastic c10d rendezvous (`c10d`)."""
    master = launch.master_addr or "127.0.0.1"
    cmd = [launch.python, "-m", "torch.distributed.run", f"--nnodes={launch.nnodes}",
           f"--nproc-per-node={launch.nproc_per_node}", *_torchrun_options()]
    if rendezvous == "c10d":
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master}:{launch.master_port}", f"--rdzv-id={job_id}"]
    else:
        cmd += [f"--node-rank={launch.node_rank}", f"--master-addr={master}", f"--master-port={launch.master_port}"]
    return cmd + launch.train_module()


def hostfile_text(hosts: list[str], slots: int) -> str:
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def deepspeed(launch: Launch, hostfile: str | None = None, no_ssh: bool = False) -> list[str]:
    """`deepspeed --hostfile` (pdsh over ssh from node 0) or `--no_ssh --node_rank` (run on every node).

    The master address is always passed: DeepSpeed guesses it (ssh to the first host, `hostname -I`)
    only when it is empty, and `resolve_launch` has already taken it from the hostfile.
    """
    cmd = [launch.python, "-m", "deepspeed.launcher.runner", f"--num_gpus={launch.nproc_per_node}",
           f"--master_addr={launch.master_addr or '127.0.0.1'}", f"--master_port={launch.master_port}",
           "--no_local_rank", "--module"]
    if hostfile:
        cmd += [f"--hostfile={hostfile}", f"--num_nodes={launch.nnodes}"]
    if no_ssh:
        cmd += ["--no_ssh", f"--node_rank={launch.node_rank}"]
    return cmd + ["pixeldit", "train", *launch.train_args]


def slurm_script(launch: Launch, job_name: str = "pixeldit", partition: str | None = None,
                 time_limit: str = "04:00:00") -> str:
    """An sbatch script: one torchrun per node via srun, c10d rendezvous on the first node.

    What SLURM does decides the shape (docs/training.md, "SLURM: time limit, preemption, requeue"):
    srun answers a SIGTERM it receives itself by SIGKILLing its tasks ("forcing job termination"), so
    the trainers must get their SIGTERM from SLURM or scancel directly, never through srun.
    - Time limit: SLURM sends USR1 to the batch shell only (`B:`), SIGNAL_LEAD_S before it; the shell
      sends SIGTERM to the training step's processes with `scancel --signal=TERM` (steps only: neither
      the batch shell nor srun), the trainers save at the next step boundary and exit, torchrun waits
      for them up to SHUTDOWN_TIMEOUT_S, and the job requeues itself and exits 0.
    - Preemption with a GraceTime: SLURM sends SIGTERM to the steps' processes only (not the batch
      step, so not srun): the trainers save and exit, torchrun then exits 1; the shell sees the job's
      PreemptTime set, requeues the job and exits 0.
    - A SIGTERM to the batch shell itself (scancel, the end of a grace time, a preemption without one)
      reached srun as well, which killed the trainers: nothing is saved, the shell waits for the step
      and exits 0; a requeued job resumes from the last periodic checkpoint.
    """
    lines = [*_sbatch_header(launch, job_name, partition, time_limit), "",
             "# no -e: the training step's exit status is examined below", "set -uo pipefail",
             *[f"export {k}={v}" for k, v in RECOMMENDED_ENV.items()],
             'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             f"MASTER_PORT={launch.master_port}", "", *_SIGNAL_TRAPS, "", *_training_step(launch), "",
             *_REQUEUE_OR_EXIT]
    return "\n".join(lines) + "\n"


def _sbatch_header(launch: Launch, job_name: str, partition: str | None, time_limit: str) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={launch.nnodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={launch.nproc_per_node}",
             f"#SBATCH --time={time_limit}", f"#SBATCH --signal=B:USR1@{SIGNAL_LEAD_S}", "#SBATCH --requeue",
             "#SBATCH --open-mode=append", "#SBATCH --output=%x-%j.out"]
    return lines + ([f"#SBATCH --partition={partition}"] if partition else [])


_SIGNAL_TRAPS = [
    "# time limit near (sbatch --signal above): SIGTERM to the training step's processes, not to srun",
    "# (srun would SIGKILL its tasks on a SIGTERM of its own: \"forcing job termination\")",
    "stop=''",
    "trap 'stop=time-limit; echo \"pixeldit: time limit in <= {lead} s: the trainers save and stop\"; "
    "scancel --signal=TERM \"$SLURM_JOB_ID\"' USR1".format(lead=SIGNAL_LEAD_S),
    "# scancel, or the end of a preemption's grace time: srun got the SIGTERM too and has killed the",
    "# trainers; wait for the step to end",
    "trap 'stop=terminated' TERM",
]


def _training_step(launch: Launch) -> list[str]:
    """One torchrun per node under srun, in the background so the traps run; its exit status in $status."""
    train = " ".join(shlex.quote(a) for a in launch.train_module())
    return [
        f"srun --kill-on-bad-exit=1 python -m torch.distributed.run --nnodes=$SLURM_NNODES "
        f"--nproc-per-node={launch.nproc_per_node} {' '.join(_torchrun_options())} --rdzv-backend=c10d "
        f"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID {train} &",
        "step=$!",
        "# a trapped signal interrupts `wait`: wait again until the step has exited, then take its status",
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done',
        'wait "$step"; status=$?',
    ]


_REQUEUE_OR_EXIT = [
    'requeue() {',
    '    scontrol requeue "$SLURM_JOB_ID" || { echo "pixeldit: scontrol requeue failed: submit this script '
    'again to resume" >&2; exit 1; }',
    "    exit 0",
    "}",
    'if [ "$stop" = time-limit ]; then',
    '    echo "pixeldit: stopped for the time limit (training step exit status $status); requeueing job '
    '$SLURM_JOB_ID, its next start resumes from the latest checkpoint"',
    "    requeue",
    "fi",
    'if [ "$stop" = terminated ]; then',
    '    echo "pixeldit: SIGTERM to the job script (scancel, or the end of a preemption grace time): srun '
    'killed the trainers (training step exit status $status); a requeued job resumes from the last '
    'checkpoint"',
    "    exit 0",
    "fi",
    "# preemption with a GraceTime signals the trainers, not this shell: they saved, torchrun exits 1",
    'if [ "$status" -ne 0 ] && scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q "PreemptTime=[0-9]"; then',
    '    echo "pixeldit: preempted: the trainers saved and stopped (training step exit status $status); '
    'requeueing job $SLURM_JOB_ID, its next start resumes from the latest checkpoint"',
    "    requeue",
    "fi",
    'exit "$status"',
]
