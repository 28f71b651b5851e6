"""Launch command builders: torchrun, the deepspeed launcher (hostfile / no-ssh), SLURM sbatch."""

from .commands import RECOMMENDED_ENV, Launch, deepspeed, hostfile_text, slurm_script, torchrun

__all__ = ["RECOMMENDED_ENV", "Launch", "deepspeed", "hostfile_text", "slurm_script", "torchrun"]
