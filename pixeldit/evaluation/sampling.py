"""Class-conditional samples of a given model into an ADM-suite .npz, on one process or many.

The images are a SamplingPlan (sampling_plan.py): image i has label classes[i % len(classes)]
(interleaved) and its noise from (seed, i). Ranks take whole batches of the images not yet
done (batch k goes to rank k mod world), write every finished batch as a part file under
`<out>.parts/`, and rank 0 assembles the .npz in image order at the end. An interrupted run
resumes from the parts, on any world size. Loading a model is the job's (jobs/sample.py).
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
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..diffusion.samplers import SAMPLERS, GuidedVelocity, timestep_grid, to_uint8
from ..distributed import world
from ..errors import ConfigError, DataError, MissingFileError
from ..models import PixelDiT
from .sampling_plan import SamplerSettings, SamplingPlan

log = logging.getLogger(__name__)

PARTS_SUFFIX = ".parts"
SETTINGS_FILE = "settings.json"
GRID_IMAGES = 64


# ---------------------------------------------------------------- what an image costs and is


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
    settings = SamplerSettings(sampler, steps, cfg_scale, tuple(cfg_interval), time_shift)
    classes = _check_request(model, classes, settings, dtype, per_class, batch_size, image_size)
    plan = SamplingPlan.interleaved(classes, len(classes) * per_class, seed, image_size)
    folder = out_path + PARTS_SUFFIX
    # everything that changes an image; batch and world size do not (beyond kernel rounding)
    fingerprint = {"arch": dataclasses.asdict(model.arch), "weights": _weights_fingerprint(model),
                   "image_size": image_size, "classes": classes, "per_class": per_class, "seed": seed,
                   "sampler": sampler, "steps": steps, "cfg_scale": float(cfg_scale),
                   "cfg_interval": [float(v) for v in cfg_interval], "time_shift": float(time_shift), "dtype": dtype}
    done = _images_done(folder, out_path, fingerprint, rank, world_size, device)
    mine = plan.batches(batch_size, rank, world_size, done)
    show = progress and rank == 0 and (sys.stderr.isatty() or os.environ.get("PIXELDIT_PROGRESS") == "1")
    evaluations, computed = _sample_parts(model, plan, mine, settings, dtype, device, folder, show, world_size,
                                          on_part)
    totals = torch.tensor([evaluations, computed], dtype=torch.int64)
    if world_size > 1:  # also the barrier before assembly: every part is on disk after it
        totals = totals.to(_collective_device(device))
        dist.all_reduce(totals)
    evaluations, computed = totals.tolist()
    if rank == 0:
        first = _assemble(folder, out_path, plan.labels, image_size)
        if grid:
            write_grid(first, grid)
        shutil.rmtree(folder)
    if world_size > 1:
        dist.barrier()  # no rank returns before the .npz exists
    return SamplingReport(out=out_path, images=len(plan), computed=computed,
                          evaluations_per_image=evaluations_per_image(sampler, steps, time_shift, cfg_scale,
                                                                      cfg_interval),
                          image_evaluations=evaluations, seconds=time.perf_counter() - start,
                          world_size=world_size)


def _check_request(model: PixelDiT, classes, settings: SamplerSettings, dtype: str, per_class: int,
                   batch_size: int, image_size: int) -> list[int]:
    """The classes to sample (all the model's by default); a request the model cannot serve is refused."""
    num_classes = model.num_classes
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    outside = [c for c in classes if not 0 <= c < num_classes]
    if not classes or outside:
        raise ConfigError(f"classes {outside[:5] or '[]'}: this model has classes 0..{num_classes - 1}")
    if settings.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {settings.sampler!r}; known: {', '.join(SAMPLERS)}")
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype={dtype!r}: expected 'fp32' or 'bf16'")
    if per_class < 1 or batch_size < 1 or settings.steps < 1:
        raise ConfigError(f"per_class={per_class}, batch_size={batch_size}, steps={settings.steps}: "
                          f"each must be >= 1")
    if image_size % model.arch.patch_size:
        raise ConfigError(f"image size {image_size} is not divisible by the patch size {model.arch.patch_size}")
    return classes


def _images_done(folder: str, out_path: str, fingerprint: dict, rank: int, world_size: int,
                 device: torch.device) -> np.ndarray:
    """The images earlier runs left in part files, as rank 0 found them, on every rank.

    Rank 0 alone lists the parts and tells the others, before anyone writes a new one: ranks
    listing at different moments would split different to-do lists.
    """
    answer = None
    if rank == 0:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            answer = _prepare_parts(folder, fingerprint)
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
    return answer


def _sample_parts(model: PixelDiT, plan: SamplingPlan, mine: list[list[int]], settings: SamplerSettings,
                  dtype: str, device: torch.device, folder: str, show: bool, world_size: int,
                  on_part) -> tuple[int, int]:
    """Sample this rank's batches, each into a part file; (image evaluations, images) of this rank."""
    from tqdm import tqdm

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def velocity_model(x, t, y):
        with autocast:
            return model(x, t, y).float()

    bar = tqdm(total=sum(len(b) for b in mine), unit="img", desc=f"sample (rank 0 of {world_size})",
               dynamic_ncols=True, disable=not show)
    evaluations = computed = 0
    for indices in mine:
        result = plan.sample(velocity_model, indices, settings, model.num_classes, device)
        evaluations += result.image_evaluations
        computed += len(indices)
        _write_part(folder, indices, to_uint8(result.images).permute(0, 2, 3, 1).cpu().numpy())
        bar.update(len(indices))
        if on_part is not None:
            on_part(indices)
    bar.close()
    return evaluations, computed
