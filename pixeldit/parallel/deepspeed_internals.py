"""Every reach into DeepSpeed's private attributes, each with why no public API serves.

Checked against deepspeed 0.19; an upgrade that renames one of these fails here, in one file.
"""

from __future__ import annotations

import argparse
import contextlib


def set_gradient_clipping(engine, clip: float):
    """The staged clip (schedule.stages): DeepSpeed reads `gradient_clipping` from its config once at
    start and offers no setter, so the value is pushed where the engine and its ZeRO optimizer read it."""
    engine._config.gradient_clipping = clip
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = clip


@contextlib.contextmanager
def universal_checkpoint_loading(engine, universal: bool):
    """load_checkpoint takes no argument for a universal checkpoint: it reads the config flag, which
    is set for this one load and off again after, so a later load is native."""
    engine._config.load_universal_checkpoint = universal
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False


def zero12_fragment(param):
    """(offset into the flattened parameter, the rank's 1-D fp32 master slice) under ZeRO-1/2, or None
    when the rank holds none of it. safe_get_local_fp32_param is defined for ZeRO-3 only, and
    safe_get_full_fp32_param gathers the whole tensor; the offset lives in the fragment mapping."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.get_hp_fragment().view(-1)


def zero3_partition_numel(param) -> int:
    """The per-rank partition size of a ZeRO-3 parameter (every rank but the last holds this many),
    which places the rank's slice; DeepSpeed exposes it only on the partitioned tensor."""
    return param.ds_tensor.ds_numel


def convert_to_universal(source: str, target: str):
    """DeepSpeed's universal-checkpoint converter has no library entry point, only its script's main()
    taking the script's argparse namespace. One worker: its pool would fork this process, process
    group and all."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=source, output_folder=target, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
