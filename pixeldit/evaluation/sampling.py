"""`pixeldit sample`: class-conditional samples into an ADM-suite .npz, on one process or many.

The image list is a pure function of (classes, per_class, seed): image i has label
classes[i % len(classes)] (interleaved) and its noise from (seed, i). Ranks take whole batches of
the images not yet done (batch k goes to rank k mod world), write every finished
batch as a part file under `<out>.parts/`, and rank 0 assembles the .npz in image
order at the end. An interrupted run resumes from the parts, on any world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import world
from ..errors import ConfigError, DataError, MissingFileError, WeightsError
from ..diffusion.samplers import SAMPLERS, GuidedVelocity, sample, timestep_grid, to_uint8
from ..models import PixelDiT

log = logging.getLogger(__name__)

PARTS_SUFFIX = ".parts"
SETTINGS_FILE = "settings.json"
GRID_IMAGES = 64


# ---------------------------------------------------------------- loading


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
    from ..models import load_authors_checkpoint
    from ..models.checkpoint_import import GROUPS
    from ..platform.export import consolidate_checkpoint, load_exported, read_export_metadata

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
    from ..data_pipelines.manifest import manifest_url, read_manifest
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


# ---------------------------------------------------------------- the image plan


def image_labels(classes, per_class: int) -> torch.Tensor:
    """Label of every image: image i has classes[i % len(classes)].

    Interleaved rather than sorted: every stretch of the file covers all classes, so the ADM
    suite's Inception Score (consecutive splits of 5,000) and any prefix of a partial run see the
    class distribution they should, not 100 classes per split.
    """
    return torch.as_tensor(list(classes), dtype=torch.int64).repeat(per_class)


def evaluations_per_image(sampler: str, steps: int, time_shift: float = 1.0, cfg_scale: float = 1.0,
                          cfg_interval=(0.0, 1.0)) -> int:
    """Images each image pushes through the model: one per velocity call, two when it is guided."""
    guided_at = GuidedVelocity(None, None, 0, cfg_scale, tuple(cfg_interval)).guided_at
    ts = timestep_grid(steps, time_shift).tolist()
    times = ts[:steps] + (ts[1:steps] if sampler == "heun" else [])  # heun: a corrector at every t_{i+1} < 1
    return sum(2 if guided_at(t) else 1 for t in times)


def _weights_fingerprint(model: PixelDiT) -> str:
    # two tensors suffice to tell checkpoints (and EMA from trained weights) apart, at no cost for XL
    digest = hashlib.sha1()
    for name in ("y_embedder.embedding_table.weight", "final_layer.linear.weight"):
        digest.update(model.get_parameter(name).detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- part files


def _write_part(folder: str, indices: list[int], images: np.ndarray):
    # named by its first image: batches are disjoint and only cover images not yet done, so a new
    # name never collides with a finished part, whatever the batch size or world size before
    name = f"part_{indices[0]:08d}.npz"
    tmp = os.path.join(folder, f".{name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
        np.savez(f, indices=np.asarray(indices, dtype=np.int64), images=images)
    os.replace(tmp, os.path.join(folder, name))


def _read_parts(folder: str) -> dict[str, np.ndarray]:
    """Part file → its image indices (the images are not read); drops what an interrupted run left."""
    parts = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") and ".tmp." in name:
            os.remove(path)  # a write that never reached its rename
        elif name.startswith("part_") and name.endswith(".npz"):
            try:
                with np.load(path) as z:
                    parts[name] = z["indices"]
            except Exception as e:  # noqa: BLE001 - e.g. a host crash before the data reached the disk
                log.warning("%s is unreadable (%s); its images are sampled again", path, e)
                os.remove(path)
    return parts


def _prepare_parts(folder: str, settings: dict) -> np.ndarray:
    """Create or check `<out>.parts/`; the sorted indices of the images already done."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise DataError(f"{folder} holds parts sampled with other settings ({', '.join(changed)} differ); "
                             f"delete it to start over, or write to another --out")
    else:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(tmp, path)
    done = list(_read_parts(folder).values())
    return np.unique(np.concatenate(done)) if done else np.empty(0, dtype=np.int64)


def _assemble(folder: str, out_path: str, labels: torch.Tensor, image_size: int) -> np.ndarray:
    """Stream the parts into out_path in image order; returns the first GRID_IMAGES images.

    The array is written member by member into the zip, so memory holds a few parts,
    not the 9.8 GB of 50k 256 px images.
    """
    n = len(labels)
    parts = _read_parts(folder)
    owner = np.full(n, -1, dtype=np.int64)
    names = sorted(parts)
    for k, name in enumerate(names):
        owner[parts[name]] = k
    missing = np.flatnonzero(owner < 0)
    if len(missing):
        raise DataError(f"{folder}: {len(missing)} images have no part (first: {missing[:5].tolist()})")
    last_use = {k: i for i, k in enumerate(owner.tolist())}
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, image_size, image_size, 3)}
    tmp = f"{out_path}.tmp.{os.getpid()}"
    first, open_parts = [], {}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for i, k in enumerate(owner.tolist()):
                if k not in open_parts:
                    with np.load(os.path.join(folder, names[k])) as z:
                        position = {int(j): p for p, j in enumerate(z["indices"])}
                        open_parts[k] = (position, z["images"])
                position, images = open_parts[k]
                image = np.ascontiguousarray(images[position[i]])
                if image.shape != (image_size, image_size, 3) or image.dtype != np.uint8:
                    raise DataError(f"{folder}/{names[k]}: image {i} is {image.dtype} {image.shape}, "
                                       f"expected uint8 {(image_size, image_size, 3)}")
                f.write(image.tobytes())
                if i < GRID_IMAGES:
                    first.append(image)
                if last_use[k] == i:
                    del open_parts[k]
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, labels.numpy().astype(np.int64))
    os.replace(tmp, out_path)
    return np.stack(first)


def write_grid(images: np.ndarray, path: str, nrow: int = 8):
    """uint8 (N, H, W, 3) → one PNG, `nrow` images per row."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=nrow, padding=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


# ---------------------------------------------------------------- sampling


@dataclass
class SamplingReport:
    out: str
    images: int  # N in the .npz
    computed: int  # images this call sampled, all ranks together (the rest came from parts)
    evaluations_per_image: int
    image_evaluations: int  # images this call pushed through the model, all ranks together
    seconds: float
    world_size: int


def _collective_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def sample_to_npz(model: PixelDiT, out_path: str, *, classes=None, per_class: int = 50, image_size: int = 256,
                  seed: int = 0, sampler: str = "ab2", steps: int = 100, cfg_scale: float = 1.0,
                  cfg_interval=(0.0, 1.0), time_shift: float = 1.0, batch_size: int = 64, dtype: str = "fp32",
                  device=None, rank: int | None = None, world_size: int | None = None, progress: bool = True,
                  grid: str | None = None, on_part=None) -> SamplingReport:
    """Sample len(classes) × per_class images into out_path (arr_0 uint8 (N, H, W, 3), arr_1 int64 labels).

    Collective when world_size > 1: every rank calls it with the same arguments.
    `on_part(indices)` runs after each part file is written.
    """
    start = time.perf_counter()
    if rank is None or world_size is None:
        rank, world_size = world()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    num_classes = model.num_classes
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    outside = [c for c in classes if not 0 <= c < num_classes]
    if not classes or outside:
        raise ConfigError(f"classes {outside[:5] or '[]'}: this model has classes 0..{num_classes - 1}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype={dtype!r}: expected 'fp32' or 'bf16'")
    if per_class < 1 or batch_size < 1 or steps < 1:
        raise ConfigError(f"per_class={per_class}, batch_size={batch_size}, steps={steps}: each must be >= 1")
    if image_size % model.arch.patch_size:
        raise ConfigError(f"image size {image_size} is not divisible by the patch size {model.arch.patch_size}")
    labels = image_labels(classes, per_class)
    n = len(labels)
    folder = out_path + PARTS_SUFFIX
    # everything that changes an image; batch and world size do not (beyond kernel rounding)
    settings = {"arch": dataclasses.asdict(model.arch), "weights": _weights_fingerprint(model),
                "image_size": image_size, "classes": classes, "per_class": per_class, "seed": seed,
                "sampler": sampler, "steps": steps, "cfg_scale": float(cfg_scale),
                "cfg_interval": [float(v) for v in cfg_interval], "time_shift": float(time_shift), "dtype": dtype}

    # rank 0 alone lists the parts and tells the others, before anyone writes a new one: ranks
    # listing at different moments would split different to-do lists
    answer = None
    if rank == 0:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            answer = _prepare_parts(folder, settings)
        except (OSError, ValueError) as e:
            answer = e
    if world_size > 1:
        box = [answer]
        dist.broadcast_object_list(box, src=0, device=_collective_device(device))
        answer = box[0]
    if isinstance(answer, Exception):
        raise answer
    if world_size > 1:
        # parts go to one folder that rank 0 assembles: every rank must see it (a shared filesystem)
        sees = torch.tensor([float(os.path.exists(os.path.join(folder, SETTINGS_FILE)))],
                            device=_collective_device(device))
        dist.all_reduce(sees, op=dist.ReduceOp.MIN)
        if sees.item() < 1:
            raise MissingFileError(f"{folder}: not visible from every rank; several nodes need --out on a "
                                    f"filesystem they share")
    todo = np.setdiff1d(np.arange(n, dtype=np.int64), answer)
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    mine = batches[rank::world_size]

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def velocity_model(x, t, y):
        with autocast:
            return model(x, t, y).float()

    from tqdm import tqdm
    show = progress and rank == 0 and (sys.stderr.isatty() or os.environ.get("PIXELDIT_PROGRESS") == "1")
    bar = tqdm(total=sum(len(b) for b in mine), unit="img", desc=f"sample (rank 0 of {world_size})",
               dynamic_ncols=True, disable=not show)
    evaluations = computed = 0
    for batch in mine:
        indices = batch.tolist()
        result = sample(velocity_model, labels[torch.from_numpy(batch)], indices, (3, image_size, image_size),
                        null_class=num_classes, seed=seed, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                        cfg_interval=tuple(cfg_interval), time_shift=time_shift, device=device)
        evaluations += result.image_evaluations
        computed += len(indices)
        _write_part(folder, indices, to_uint8(result.images).permute(0, 2, 3, 1).cpu().numpy())
        bar.update(len(indices))
        if on_part is not None:
            on_part(indices)
    bar.close()

    totals = torch.tensor([evaluations, computed], dtype=torch.int64)
    if world_size > 1:  # also the barrier before assembly: every part is on disk after it
        totals = totals.to(_collective_device(device))
        dist.all_reduce(totals)
    evaluations, computed = totals.tolist()
    if rank == 0:
        first = _assemble(folder, out_path, labels, image_size)
        if grid:
            write_grid(first, grid)
        shutil.rmtree(folder)
    if world_size > 1:
        dist.barrier()  # no rank returns before the .npz exists
    return SamplingReport(out=out_path, images=n, computed=computed,
                          evaluations_per_image=evaluations_per_image(sampler, steps, time_shift, cfg_scale,
                                                                      cfg_interval),
                          image_evaluations=evaluations, seconds=time.perf_counter() - start,
                          world_size=world_size)


# ---------------------------------------------------------------- the command


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
    from ..distributed import join_process_group
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
