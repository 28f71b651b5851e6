"""`pixeldit sample`: a model from an export, a training run (any strategy) or the authors' .ckpt,
sampled into an ADM-suite .npz (evaluation/sampling.py), on one process or many."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..data_pipelines.manifest import manifest_url, read_manifest
from ..distributed import join_process_group
from ..errors import ConfigError, MissingFileError, WeightsError
from ..evaluation.sampling import evaluations_per_image, sample_to_npz
from ..models import PixelDiT, load_authors_checkpoint
from ..models.checkpoint_import import GROUPS
from ..platform.export import consolidate_checkpoint, load_exported, read_export_metadata

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """Where a sampling model came from, and the training facts that travel with it."""

    kind: str  # export | run | authors
    path: str
    weights: str  # ema | model
    step: int | None = None
    image_size: int | None = None
    time_shift: float | None = None
    data_classes: int | None = None  # the training data's class count, where the run says and it is readable

    def __str__(self) -> str:
        step = f" step {self.step}" if self.step is not None else ""
        return f"{self.path} ({self.kind}{step}, {self.weights} weights)"


def _model_from_state(arch, state: dict, device) -> PixelDiT:
    # built on meta and filled by assignment: no random init of weights about to be replaced
    with torch.device("meta"):
        model = PixelDiT(arch)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()


def load_sampling_model(source: str, weights: str = "ema", device="cpu") -> tuple[PixelDiT, ModelSource]:
    """A PixelDiT in eval mode from an export, a training run (any strategy) or the authors' .ckpt."""
    if weights not in ("ema", "model"):
        raise ConfigError(f"weights={weights!r}: expected 'ema' or 'model'")
    if not os.path.exists(source):
        raise MissingFileError(f"{source}: no such file or directory (expected an exported .safetensors, "
                                f"a training run directory or the authors' .ckpt)")
    if os.path.isdir(source):
        with warnings.catch_warnings():
            # DCP warns that it loads in one process when no process group exists: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            full = consolidate_checkpoint(source, parts=(weights,))
        config = full["meta"]["config"]
        info = ModelSource("run", full["checkpoint"], weights, int(full["meta"]["step"]),
                           int(config["data"]["image_size"]), float(config["diffusion"]["time_shift"]),
                           _data_class_count(config["data"]))
        return _model_from_state(full["arch"], full[weights], device), info
    if source.endswith(".safetensors"):
        meta = read_export_metadata(source)
        info = ModelSource("export", source, weights, int(meta["step"]),
                           int(meta["image_size"]) if "image_size" in meta else None,
                           float(meta["time_shift"]) if "time_shift" in meta else None)
        return load_exported(source, weights, device), info
    imported = load_authors_checkpoint(source)
    if imported[weights] is None:
        raise WeightsError(f"{source}: has no {GROUPS[weights]}* weights (try --weights "
                       f"{'model' if weights == 'ema' else 'ema'})")
    return _model_from_state(imported["arch"], imported[weights], device), ModelSource("authors", source, weights)


def _data_class_count(data: dict) -> int | None:
    """How many classes the run's training data had (None where its manifest is gone)."""
    options = {"endpoint_url": data["endpoint_url"]} if data.get("endpoint_url") else None
    try:
        return len(read_manifest(data["source"], options)[0].classes)
    except MissingFileError:
        log.warning("%s is gone: sampling cannot check which classes the run's data had",
                    manifest_url(data["source"]))
        return None


def check_data_classes(classes: list[int] | None, num_classes: int, source: ModelSource) -> list[int] | None:
    """The classes to draw: never more than the run's data had (a model with more rows than its
    data's classes never learned the others; a run that trained with the class check has none)."""
    n = source.data_classes
    if n is None or n >= num_classes:
        return classes
    if classes is None:
        log.warning("%s: the model has %d classes, its training data %d: drawing classes 0..%d",
                    source.path, num_classes, n, n - 1)
        return list(range(n))
    outside = [c for c in classes if c >= n]
    if outside:
        raise ConfigError(f"--classes {outside[:5]}: {source.path} was trained on data with {n} classes; "
                          f"pick classes in 0..{n - 1}")
    return classes


def _device(device_arg: str | None, local_rank: int) -> torch.device:
    if device_arg in (None, "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device(device_arg or "cpu")


def _describe_classes(classes: list[int] | None, num_classes: int) -> str:
    if classes is None or classes == list(range(num_classes)):
        return f"all {num_classes} classes"
    shown = ",".join(map(str, classes[:8])) + ("…" if len(classes) > 8 else "")
    return f"{len(classes)} classes ({shown})"


def run_sample_command(args) -> int:
    cuda = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
    rank, world, local_rank, started = join_process_group(cuda)
    try:
        device = _device(args.device, local_rank)
        model, source = load_sampling_model(args.source, args.weights, device)
        args.classes = check_data_classes(args.classes, model.num_classes, source)
        image_size = args.image_size or source.image_size or 256
        time_shift = args.time_shift if args.time_shift is not None else (source.time_shift or 1.0)
        cfg_interval = tuple(args.cfg_interval)
        per_image = evaluations_per_image(args.sampler, args.steps, time_shift, args.cfg_scale, cfg_interval)
        n = len(args.classes or range(model.num_classes)) * args.per_class
        guidance = (f"cfg {args.cfg_scale:g} on ({cfg_interval[0]:g}, {cfg_interval[1]:g})"
                    if args.cfg_scale != 1.0 else "no guidance")
        if rank == 0:
            print(f"model        {source}", flush=True)
            print(f"plan         {n} images {image_size}x{image_size}: "
                  f"{_describe_classes(args.classes, model.num_classes)} x {args.per_class}, seed {args.seed}; "
                  f"{args.sampler} {args.steps} steps, {guidance}, time shift {time_shift:g}, "
                  f"{'bf16' if args.bf16 else 'fp32'}, batch {args.batch_size} x {world} process(es) on {device}",
                  flush=True)
        report = sample_to_npz(model, args.out, classes=args.classes, per_class=args.per_class,
                               image_size=image_size, seed=args.seed, sampler=args.sampler, steps=args.steps,
                               cfg_scale=args.cfg_scale, cfg_interval=cfg_interval, time_shift=time_shift,
                               batch_size=args.batch_size, dtype="bf16" if args.bf16 else "fp32", device=device,
                               rank=rank, world_size=world, grid=args.grid)
        if rank == 0:
            resumed = n - report.computed
            print(f"wrote        {os.path.abspath(args.out)}: arr_0 uint8 ({n}, {image_size}, {image_size}, 3), "
                  f"arr_1 int64 labels" + (f"; grid {args.grid}" if args.grid else ""))
            calls = 2 * args.steps - 1 if args.sampler == "heun" else args.steps
            print(f"evaluations  {per_image} image-evaluations per image ({calls} velocity calls, "
                  f"{per_image - calls} of them guided), "
                  f"{report.image_evaluations} in total for {report.computed} images sampled"
                  + (f" ({resumed} taken from earlier parts)" if resumed else ""))
            rate = report.computed / report.seconds if report.seconds > 0 else 0.0
            print(f"wall time    {report.seconds:.1f} s ({rate:.2f} images/s over {world} process(es))")
        return 0
    finally:
        if started:
            dist.destroy_process_group()
