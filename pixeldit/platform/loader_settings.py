"""The loader's settings from a run's config: the one place the data floor's view of a Config is made."""

from __future__ import annotations

from ..data_pipelines.loader import LoaderSettings


def loader_settings(cfg, per_rank: int) -> LoaderSettings:
    """`cfg` (a Config) as the loader needs it; `per_rank` is the batch layout's samples per rank and step."""
    data, arch = cfg.data, cfg.model.arch()
    return LoaderSettings(
        source=data.source, image_size=data.image_size, per_rank=per_rank, seed=cfg.train.seed,
        num_classes=arch.num_classes, patch_size=arch.patch_size, decoder=data.decoder,
        num_workers=data.num_workers, hflip=data.hflip, shuffle_window=data.shuffle_window,
        endpoint_url=data.endpoint_url, retries=data.retries, io_timeout_s=data.io_timeout_s,
        max_skipped_fraction=data.max_skipped_fraction,
        features=cfg.repa.features if cfg.repa.kind().reads_features else None, encoder_dim=cfg.repa.encoder_dim)
