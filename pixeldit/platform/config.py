"""The one config system: typed dataclasses, loaded from YAML, with `--set a.b=value`.

Every value is checked against its field's type while loading, and every
unknown key is refused with a "did you mean" (difflib), each error naming the
key path (`optim.betas`, `schedule.stages[1].clip`) and the file or the `--set`
it came from, before any work starts. Sections validate their own ranges in
`check()`; `Config.check()` holds the cross-section rules. The batch layout over
a world size is decided in batch_layout.py (`TrainConfig.layout`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ..errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"


# ---------------------------------------------------------------- sections

@dataclass
class ModelConfig:
    name: str = "pixeldit-tiny"
    # None keeps the preset's value; any other value overrides it (see models.PixelDiTArch)
    patch_depth: Optional[int] = None
    pixel_depth: Optional[int] = None
    hidden_size: Optional[int] = None
    pixel_hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    num_classes: Optional[int] = None
    variant: Optional[Literal["pixeldit", "dit"]] = None
    pixel_adaln: Optional[Literal["pixel", "patch"]] = None
    post_modulation: Optional[bool] = None

    def overrides(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "name" and getattr(self, f.name) is not None}

    def arch(self):
        from pixeldit.models import resolve_arch
        try:
            return resolve_arch(self.name, **self.overrides())
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class DataConfig:
    # "synthetic" for generated demo data, otherwise a manifest folder URL (path, s3://, gs://, https://)
    source: str = "synthetic"
    image_size: int = 32
    decoder: Literal["pil", "dali"] = "pil"
    # read lanes, and decode threads for pil. Part of the order: resume with the same value
    num_workers: int = 0
    # random horizontal flips (the authors trained without)
    hflip: bool = False
    # samples permuted together inside a lane; a resume re-reads at most one window per lane
    shuffle_window: int = 512
    # S3-compatible endpoint (else AWS_ENDPOINT_URL / the default); credentials from the environment
    endpoint_url: Optional[str] = None
    # retries of one S3 request inside the client (quick, counted), before the reader's own backoff
    retries: int = 2
    # corrupt content (undecodable image, bad label, truncated member) is skipped and counted; past
    # this fraction of an epoch's samples the run stops (docs/data.md)
    max_skipped_fraction: float = 0.001
    # overall deadline of one storage operation, retries included; past it the run stops naming the URL
    io_timeout_s: float = 120.0

    def check(self, path: str):
        _positive(self, path, "image_size", "shuffle_window", "retries", "io_timeout_s")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(f"{path}.max_skipped_fraction={self.max_skipped_fraction} must be in [0, 1]")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers={self.num_workers} must be >= 0")


@dataclass
class DiffusionConfig:
    # logit-normal t: t = sigmoid(loc + scale·n), n ~ N(0, 1)
    t_loc: float = 0.0
    t_scale: float = 1.0
    # t' = t / (t + (1 − t)·s): 1 at 256 px, 3 at 512 px; used by training and sampling
    time_shift: float = 1.0
    label_drop: float = 0.1

    def check(self, path: str):
        _positive(self, path, "t_scale", "time_shift")
        if not 0.0 <= self.label_drop <= 1.0:
            raise ConfigError(f"{path}.label_drop={self.label_drop} must be in [0, 1]")


@dataclass
class RepaConfig:
    # online: DINOv2 runs on each batch; cached: targets stream from `pixeldit repa-cache` shards
    mode: Literal["online", "cached", "off"] = "off"
    weight: float = 0.5
    block: int = 8
    # online: DINOv2 weights, a file (Meta's or timm's layout) or a hub name such as dinov2_vitb14
    encoder: str = "dinov2_vitb14"
    encoder_dim: int = 768
    # cached: the feature shards' folder URL (they mirror data.source one to one)
    features: str | None = None

    def check(self, path: str):
        if self.weight < 0:
            raise ConfigError(f"{path}.weight={self.weight} must be >= 0")
        self.kind().check(self, path)

    def kind(self):
        """The mode's object (platform/repa.py): the one place that decides what each mode does."""
        from .repa import repa_mode
        return repa_mode(self.mode)


@dataclass
class OptimConfig:
    """AdamW. The lr has one owner, the schedule: `schedule.stages[0].lr` is the starting lr."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8

    def check(self, path: str):
        _positive(self, path, "eps")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{path}.betas={list(self.betas)} must lie in [0, 1)")


@dataclass
class Stage:
    """The lr and clip in force from `start` (in schedule.unit) until the next stage; the only lr setting."""
    start: int = 0
    lr: float = 1e-4
    clip: float = 1.0


@dataclass
class ScheduleConfig:
    unit: Literal["step", "epoch"] = "step"
    warmup_steps: int = 0
    stages: list[Stage] = field(default_factory=lambda: [Stage()])

    def check(self, path: str):
        if not self.stages:
            raise ConfigError(f"{path}.stages must hold at least one stage")
        if self.stages[0].start != 0:
            raise ConfigError(f"{path}.stages[0].start={self.stages[0].start} must be 0")
        for i, (a, b) in enumerate(zip(self.stages, self.stages[1:]), start=1):
            if b.start <= a.start:
                raise ConfigError(f"{path}.stages[{i}].start={b.start} must be after {a.start}")
        for i, s in enumerate(self.stages):
            if s.lr <= 0 or s.clip <= 0:
                raise ConfigError(f"{path}.stages[{i}]: lr and clip must be positive")


@dataclass
class EMAConfig:
    decay: float = 0.9999
    # min(decay, (1 + n) / (10 + n)) after n updates: lets a short run's EMA leave its init
    warmup: bool = False

    def check(self, path: str):
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"{path}.decay={self.decay} must be in (0, 1)")


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3"] = "ddp"
    precision: Literal["bf16", "fp32"] = "fp32"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # a collective that waits longer than this is an error naming the rank and the step
    timeout_s: int = 600

    def check(self, path: str):
        _positive(self, path, "timeout_s")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    # a folder all ranks see, or an fsspec URL (s3://bucket/run/checkpoints) for nodes without a shared
    # filesystem; None: <train.run_dir>/checkpoints
    dir: Optional[str] = None
    # S3-compatible endpoint for an s3:// dir (else AWS_ENDPOINT_URL / the default); credentials from the environment
    endpoint_url: Optional[str] = None

    def check(self, path: str):
        _positive(self, path, "every_steps", "keep_last")
        if self.dir is not None and "://" in self.dir:
            import fsspec
            protocol = self.dir.split("://", 1)[0]
            try:
                fsspec.get_filesystem_class(protocol)
            except (ValueError, ImportError) as e:
                raise ConfigError(f"{path}.dir={self.dir!r}: no fsspec filesystem for {protocol}:// ({e})") from None


@dataclass
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    # Weights & Biases beside TensorBoard (pip install 'pixeldit[wandb]'; WANDB_MODE=offline works)
    wandb: bool = False
    wandb_project: str = "pixeldit"
    # EMA sample grid in TensorBoard every N steps (0: never); few images, fixed seeds and classes
    sample_every_steps: int = 0
    sample_steps: int = 25
    # per-device peak TFLOP/s for MFU; 0 looks the device up in a table (no MFU on CPUs)
    peak_tflops: float = 0.0
    # consecutive non-finite steps before the run stops
    max_skipped_steps: int = 20

    def check(self, path: str):
        _positive(self, path, "every_steps", "sample_steps", "max_skipped_steps")


@dataclass
class EvalConfig:
    """Evaluation in the training loop: every `every_steps` (0 = never) the EMA weights sample
    `num_images` on all ranks; a grid is logged and, with Inception weights and a reference batch,
    FID-num_images (docs/evaluation.md)."""
    every_steps: int = 0
    num_images: int = 1000
    batch_size: int = 50
    seed: int = 0
    sampler: Literal["ab2", "euler", "heun", "sde"] = "ab2"
    steps: int = 100
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    # pt_inception-2015-12-05-6726825d.pth (a file or URL); the ADM reference batch .npz
    inception: Optional[str] = None
    reference: Optional[str] = None

    def check(self, path: str):
        _positive(self, path, "steps", "num_images", "batch_size")
        if self.every_steps < 0:
            raise ConfigError(f"{path}.every_steps={self.every_steps} must be >= 0 (0: off)")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"{path}.cfg_interval={list(self.cfg_interval)} must satisfy 0 <= lo < hi <= 1")
        if self.inception and not self.reference:
            raise ConfigError(f"{path}.reference is required with {path}.inception (FID needs reference "
                              f"statistics: the ADM reference batch .npz)")


@dataclass
class TrainConfig:
    seed: int = 0
    # the recipe's batch per optimizer step, whatever the number of GPUs
    global_batch: int = 8
    # the most samples per forward / backward on one rank (a memory choice), or `auto`; the
    # accumulation follows from the world size (platform/batch_layout.py)
    micro_batch: int | Literal["auto"] = "auto"
    steps: int = 20
    run_dir: str = "runs/demo"
    init_from: Optional[str] = None
    # recompute block activations in backward: none | every block | selective (every other block)
    activation_checkpointing: Literal["none", "every", "selective"] = "none"
    # torch.compile each block (kept per block so FSDP2 still shards block by block)
    compile: bool = False

    def check(self, path: str):
        _positive(self, path, "global_batch", "steps")
        if self.micro_batch != "auto":
            _positive(self, path, "micro_batch")

    def layout(self, world: int, per_node: int | None = None):
        """This batch over `world` ranks (a LaunchError naming what would work if it cannot be)."""
        from .batch_layout import batch_layout
        return batch_layout(self.global_batch, self.micro_batch, world, per_node)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check(f.name)
        arch = self.model.arch()
        if self.data.image_size % arch.patch_size:
            raise ConfigError(f"data.image_size={self.data.image_size} is not divisible by the "
                              f"model's patch size {arch.patch_size}")
        if self.repa.kind().has_loss and not 1 <= self.repa.block <= arch.patch_depth:
            raise ConfigError(f"repa.block={self.repa.block} outside 1..{arch.patch_depth} (model.patch_depth)")
        return self

    def parallel_spec(self, world: int):
        """What the parallel floor needs of this config on `world` ranks (pixeldit/parallel/spec.py)."""
        from ..parallel.spec import OptimizerSpec, ParallelSpec

        layout = self.train.layout(world)
        first = self.schedule.stages[0]
        optimizer = OptimizerSpec(lr=first.lr, clip=first.clip, betas=tuple(self.optim.betas), eps=self.optim.eps,
                                  weight_decay=self.optim.weight_decay)
        return ParallelSpec(strategy=self.distributed.strategy, bf16=self.distributed.precision == "bf16",
                            global_batch=self.train.global_batch, micro_batch=layout.micro_batch,
                            accumulation=layout.accumulation,
                            activation_checkpointing=self.train.activation_checkpointing,
                            compile=self.train.compile, optimizer=optimizer)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading

def _positive(section, path: str, *names: str):
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"{path}.{name}={value} must be positive")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _expected(tp) -> str:
    """What a value of annotation `tp` looks like, for error messages."""
    if typing.get_origin(tp) is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", None) or str(tp).replace("typing.", ""))


def _convert(value, tp, path: str):
    """Check `value` against the annotation `tp` and build dataclasses, naming `path` on error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{path}: expected {' or '.join(_expected(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if value is False and "off" in args:
            value = "off"  # YAML 1.1 reads a bare `off` as false
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string, not a float
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp}")


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"{where}: unknown key ({_did_you_mean(where, sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------- --set and suggestions

_PIECE = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)")


def _key_paths(node, prefix: str = "") -> list[str]:
    """Every settable path of a config tree: sections, values and list items (`schedule.stages[0].lr`)."""
    paths = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            paths += [path, *_key_paths(value, path)]
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, value in enumerate(node):
            paths += [f"{prefix}[{i}]", *_key_paths(value, f"{prefix}[{i}]")]
    return paths


@functools.cache
def _default_paths() -> tuple[str, ...]:
    return tuple(_key_paths(Config().to_dict()))


def _leaf(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path.rsplit(".", 1)[-1])


def _did_you_mean(path: str, known: list[str], paths: tuple[str, ...] | None = None) -> str:
    """`did you mean X?` for a wrong key path: the same name elsewhere (optim.lr -> the schedule's),
    else a close spelling of the name, else a close spelling of the whole path; the known keys when
    nothing is close."""
    paths = paths or _default_paths()
    leaves = sorted({_leaf(p) for p in paths})
    name = _leaf(path)
    close = [name] if name in leaves else difflib.get_close_matches(name, leaves, n=1, cutoff=0.75)
    candidates = [p for p in paths if close and _leaf(p) == close[0]]
    if candidates:
        best = max(candidates, key=lambda p: difflib.SequenceMatcher(None, path, p).ratio())
        return f"did you mean {best}?"
    spelled = difflib.get_close_matches(path, paths, n=1, cutoff=0.75)
    if spelled:
        return f"did you mean {spelled[0]}?"
    return f"known: {', '.join(known)}"


def _parse_key(key: str, assignment: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in key.split("."):
        match = _PIECE.fullmatch(piece)
        if not match:
            raise ConfigError(f"--set {assignment}: {key!r} is not a key path (write it like optim.betas or "
                              f"schedule.stages[0].lr)")
        parts.append(match.group(1))
        parts += [int(i) for i in re.findall(r"\d+", match.group(2))]
    return parts


def _path_text(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _apply_override(tree: dict, assignment: str):
    """`key.path=value` into the full tree of a loaded config, every error naming the --set."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value, e.g. --set train.steps=100")
    key, raw = (text.strip() for text in assignment.split("=", 1))
    parts = _parse_key(key, assignment)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        reason = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({reason})") from None
    node = tree
    for depth, part in enumerate(parts):
        where = _path_text(parts[:depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list):
                raise ConfigError(f"--set {assignment}: {_path_text(parts[:depth])} is not a list")
            if not 0 <= part < len(node):
                raise ConfigError(f"--set {assignment}: {_path_text(parts[:depth])} has {len(node)} item(s) "
                                  f"(0..{len(node) - 1}); to add one, set the whole list, e.g. --set "
                                  f"'schedule.stages=[{{start: 0, lr: 1e-4}}, {{start: 100, lr: 1e-5}}]'")
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {assignment}: {_path_text(parts[:depth])} is a value, not a section")
        elif part not in node:
            paths = tuple(_key_paths(tree))
            raise ConfigError(f"--set {assignment}: unknown key {where} "
                              f"({_did_you_mean(_path_text(parts), sorted(node), paths)})")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def resolve_config_path(path: str | Path) -> Path:
    """`path` as given when it exists (relative to the working directory); else a relative path is looked
    up in the package's config folder, with or without its `configs/` prefix, so that
    `configs/imagenet256/pixeldit_xl.yaml` and `imagenet256/pixeldit_xl.yaml` work from any folder."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = CONFIG_DIR.joinpath(*parts) if parts else None
    return shipped if shipped is not None and shipped.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (default: the embedded demo config) + `a.b=value` overrides -> checked Config.

    A relative path missing from the working directory is looked up among the shipped configs
    (`resolve_config_path`). The file alone is built and checked first: its errors name the file.
    Each override then sets one path of the full config (list items by index:
    `schedule.stages[0].lr`); its typing errors name that `--set`. The rules run on the final
    result, and when it breaks one the first `--set` after which the rules fail is named (so a value
    one override breaks and a later one repairs is accepted).
    """
    path = resolve_config_path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (a path from the working directory, or a shipped "
                          f"config such as configs/imagenet256/pixeldit_xl.yaml)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give a YAML file, e.g. {path}/pixeldit_xl.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        cfg = _build(Config, tree, "").check()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    stages = []  # (assignment, the config after it)
    full = cfg.to_dict()
    for assignment in overrides:
        _apply_override(full, assignment)
        try:
            stages.append((assignment, _build(Config, full, "")))
        except ConfigError as e:
            raise ConfigError(f"--set {assignment}: {e}") from None
    if not stages:
        return cfg
    try:
        return stages[-1][1].check()
    except ConfigError:
        pass
    for assignment, partial in stages:
        try:
            partial.check()
        except ConfigError as e:
            raise ConfigError(f"--set {assignment}: {e}") from None
    raise AssertionError("the final config failed its checks but no prefix of the overrides did")


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree, "").check()
