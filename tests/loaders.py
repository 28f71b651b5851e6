"""The loader a test gets from a config: what the trainer builds for one rank."""

from pixeldit.data_pipelines.loader import build_loader
from pixeldit.platform.loader_settings import loader_settings


def config_loader(cfg, rank: int, world_size: int):
    """The loader the trainer would build from `cfg` for `rank` of `world_size`."""
    return build_loader(loader_settings(cfg, cfg.train.layout(world_size).per_rank), rank, world_size)
