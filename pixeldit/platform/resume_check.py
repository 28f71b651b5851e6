"""Which config changes a run may carry across a resume, decided key by key.

A checkpoint's meta.json holds the config it was trained with. Before any state is loaded, the
current config is compared with it: a change that cannot load (the architecture, the strategy's
layout) or that would silently turn the run into another one (the data, its order, the global
batch, the per-sample draws, optimizer settings the loaded optimizer state overrides) is refused
with one message listing every such key. Everything else may change (docs/training.md, "Resuming":
the same table, with the reasons).
"""

from __future__ import annotations

import hashlib
import json

from ..errors import CheckpointError, ConfigError
from .repa import repa_mode

FIXED, FREE = "fixed", "free"

# Every config key, or a whole section ("model."), with its policy. tests/test_resume_checks.py
# requires a decision for each key of Config: a new key must be placed here deliberately.
POLICY: dict[str, str] = {
    # the architecture: the saved tensors have its shapes (compared as the resolved architecture)
    "model.": FIXED,
    # the data and everything the sample order is a function of (docs/data.md)
    "data.source": FIXED, "data.image_size": FIXED, "data.num_workers": FIXED, "data.shuffle_window": FIXED,
    "data.hflip": FIXED,
    # how the same samples are read and decoded
    "data.decoder": FREE, "data.endpoint_url": FREE, "data.retries": FREE,
    "data.max_skipped_fraction": FREE, "data.io_timeout_s": FREE,
    # every field changes the per-sample draws (t, label drop) or the target
    "diffusion.": FIXED,
    # the projector's place and shape, and whether there is one; weight, weights file and cache location may move
    "repa.mode": FIXED, "repa.block": FIXED, "repa.encoder_dim": FIXED,
    "repa.weight": FREE, "repa.encoder": FREE, "repa.features": FREE,
    # AdamW's settings come back with the optimizer state, which would silently override a new value
    # (the lr is the schedule's, set every step)
    "optim.betas": FIXED, "optim.weight_decay": FIXED, "optim.eps": FIXED,
    "ema.decay": FREE, "ema.warmup": FREE,
    "schedule.": FREE,
    # the engine's checkpoint layout; the world size may change (each strategy reshards on load)
    "distributed.strategy": FIXED, "distributed.precision": FIXED, "distributed.backend": FREE,
    "distributed.timeout_s": FREE,
    "checkpoint.": FREE,
    "logging.": FREE,
    "eval.": FREE,
    # seed: the draws and the order; global batch: the recipe and the sample indices of each step;
    # accumulation changes nothing (draws are per sample)
    "train.seed": FIXED, "train.global_batch": FIXED, "train.micro_batch": FREE, "train.steps": FREE,
    "train.run_dir": FREE, "train.init_from": FREE, "train.activation_checkpointing": FREE, "train.compile": FREE,
}

ALLOWED = ("the lr stages, warm-up and clip (schedule.*), train.steps, train.micro_batch, the world size, "
           "logging.*, checkpoint.* (cadence, keep_last), eval.*, ema.*, repa.weight, data retries and "
           "timeouts, data.decoder, activation checkpointing and compile")


def policy(key: str) -> str | None:
    """The decision for a flattened key, None for a key nobody decided on."""
    if key in POLICY:
        return POLICY[key]
    section = key.split(".", 1)[0] + "."
    return POLICY.get(section)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value)


def _same_architecture(saved: dict, current: dict) -> bool:
    from ..models import resolve_arch

    def arch(model: dict):
        model = dict(model)
        return resolve_arch(model.pop("name"), **{k: v for k, v in model.items() if v is not None})
    try:
        return arch(saved) == arch(current)
    except ConfigError:  # a saved preset or field this version no longer knows
        return False


def data_fingerprint(manifest) -> str:
    """The data's identity wherever it is read from: its classes and each shard's name, count and sha256."""
    content = {"classes": list(manifest.classes), "shards": [[s.name, s.samples, s.sha256] for s in manifest.shards]}
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def refused_changes(saved: dict, cfg, saved_data: str | None = None,
                    data: str | None = None) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for each change a resume cannot carry. `saved_data` and `data`
    are the data fingerprints of the checkpoint and of this run (None where unknown)."""
    from .config import Config

    defaults = flatten(Config().to_dict())
    old, new = flatten(saved), flatten(cfg.to_dict())
    # without a projector on one side its block and width are moot (a mode change is listed itself)
    modes = (new.get("repa.mode"), old.get("repa.mode", defaults["repa.mode"]))
    repa_off = not all(repa_mode(mode).has_loss for mode in modes)
    zero = str(new.get("distributed.strategy", "")).startswith("zero")
    changes = []
    for key, value in new.items():
        # a key the saved config predates had its default then
        before = old.get(key, defaults.get(key))
        if before == value:  # both plain JSON values: tuples were written as lists on either side
            continue
        decided = policy(key)
        if decided == FREE:
            continue
        if key.startswith("model."):
            continue  # below, on the resolved architecture
        if key.startswith("repa.") and key != "repa.mode" and repa_off:
            continue
        if key == "distributed.precision" and not zero:
            continue  # ddp and fsdp keep fp32 masters either way; DeepSpeed's files differ per precision
        if key == "data.source" and saved_data is not None and saved_data == data:
            continue  # the same shards, moved (a copy, another mount, the run directory's demo data)
        changes.append((key, before, value))
    source = new.get("data.source")
    if saved_data and data and saved_data != data and old.get("data.source") == source:
        changes.append(("data.source", f"{source} (shards {saved_data[:12]})", f"{source} (shards {data[:12]})"))
    saved_model = {k[len("model."):]: v for k, v in old.items() if k.startswith("model.")}
    current_model = {k[len("model."):]: v for k, v in new.items() if k.startswith("model.")}
    if saved_model and not _same_architecture(saved_model, current_model):
        differing = [(f"model.{k}", saved_model.get(k), v) for k, v in current_model.items()
                     if saved_model.get(k) != v]
        changes = differing + changes
    return changes


def check_resume_config(saved: dict, cfg, checkpoint: str, saved_data: str | None = None, data: str | None = None):
    """Refuse, in one line, a resume whose config changes what a run cannot change."""
    changes = refused_changes(saved, cfg, saved_data, data)
    if not changes:
        return
    listed = ", ".join(f"{key}: {_show(a)} -> {_show(b)}" for key, a, b in changes)
    raise CheckpointError(
        f"cannot resume {checkpoint} with this config: {listed} (the architecture, data and sample order, global "
        f"batch, diffusion draws, seed, optimizer betas/eps/weight decay and strategy stay as saved; a resume may "
        f"change {ALLOWED}). Set these back to the saved values, or train a fresh run with --run-dir "
        f"<another folder>")


def undecided_keys() -> list[str]:
    """Config keys without a policy (the test asks for none)."""
    from .config import Config

    return [k for k in flatten(Config().to_dict()) if policy(k) is None]
