"""Launch command builders: torchrun, the deepspeed launcher (hostfile / no-ssh), SLURM sbatch."""

from .commands import (RECOMMENDED_ENV, SHUTDOWN_TIMEOUT_S, SIGNAL_LEAD_S, Launch, child_pids, deepspeed,
                       hostfile_text, read_hostfile, resolve_launch, slurm_script, torchrun)

__all__ = ["RECOMMENDED_ENV", "SHUTDOWN_TIMEOUT_S", "SIGNAL_LEAD_S", "Launch", "child_pids", "deepspeed",
           "hostfile_text", "read_hostfile", "resolve_launch", "slurm_script", "torchrun"]
