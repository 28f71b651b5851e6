"""Config, trainer, strategies, schedules, checkpointing, monitoring. Wraps models from outside."""
