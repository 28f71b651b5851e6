"""Every GPU-only check in one script: run it once on a GPU machine and keep its JSON.

    torchrun --nproc-per-node 1 bench/gpu_check.py --json gpu_check.json

1. DALI `mixed` decode of real photographs vs the CPU decoders (same keys, pixel agreement, img/s);
   the pil decoder's decode processes with batches copied into pinned memory on a CUDA host
   (same pixels as on CPU, pinned).
2. PixelDiT-XL bf16 train steps at 256² under fsdp and zero2, each with and without activation
   checkpointing and with and without torch.compile (same trainer code as CPU runs), at the largest
   micro batch `pixeldit plan` says fits this device (stepped down by a quarter on an out-of-memory
   error): img/s, MFU against the device's bf16 peak, peak memory against the plan's. Each variant
   is printed and written to the JSON as it finishes, so a run cut short keeps what it measured.
   `--plan-only` prints the variants and their planned micro batches (any machine, no GPU).
3. REPA: PixelDiT-B bf16 step with online DINOv2-B targets vs cached ones (bench/repa.py on cuda),
   and the encoder's img/s (the cache job's bound).
4. Sampling: images/s and evaluations per image of each sampler, PixelDiT-XL 256² bf16, 10 steps
   (bench/sample.py on cuda).
It needs a CUDA device; on a CPU-only machine it says so and exits 2.

The eight train variants build PixelDiT-XL eight times, four of them compiled: several minutes.
Where device time comes in short calls, split the run and keep each JSON:
`--only train --strategies fsdp`, `--only train --strategies zero2`, `--only dali,repa,sample`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def dali_check(workdir: str) -> dict:
    from pixeldit.data_pipelines.lanes import LoaderSpec
    from pixeldit.data_pipelines.loader import ShardLoader
    from pixeldit.data_pipelines.manifest import ImagePolicy, load_manifest
    from pixeldit.data_pipelines.source import Split
    from pixeldit.data_pipelines.writer import list_image_folder, write_shards
    from tests.photos import make_photo_folder

    src = os.path.join(workdir, "photos")
    make_photo_folder(__import__("pathlib").Path(src), classes=4, per_class=64, with_bad=False)
    items, classes = list_image_folder(src)
    out = {}
    for name, policy in (("precropped", ImagePolicy("adm", 256, "jpg", 95)), ("original", ImagePolicy())):
        root = os.path.join(workdir, name)
        write_shards(items, classes, root, policy=policy, shard_samples=64, progress=False)
        spec = LoaderSpec(load_manifest(root), root, 256, 32, 0, Split(1, 0, 2, 32), 64, False, None)
        timings, batches = {}, {}
        # pil on a CUDA host: the reading threads copy each decoded batch into pinned memory: same pixels
        for label, decoder, device in (("pil", "pil", "cpu"), ("pil_pinned", "pil", "cuda"), ("dali", "dali", "cuda")):
            start = time.perf_counter()
            batches[label] = list(ShardLoader(spec, decoder, num_workers=2, device=device))
            torch.cuda.synchronize()
            timings[label] = sum(len(b["key"]) for b in batches[label]) / (time.perf_counter() - start)
        same_keys = [b["key"] for b in batches["pil"]] == [b["key"] for b in batches["dali"]]
        diff = torch.cat([(a["image"].int() - b["image"].cpu().int()).abs().flatten()
                          for a, b in zip(batches["pil"], batches["dali"])]).float()
        pinned_same = all(torch.equal(a["image"], b["image"]) and b["image"].is_pinned()
                          for a, b in zip(batches["pil"], batches["pil_pinned"], strict=True))
        out[name] = {"same_keys": same_keys, "mean_abs_diff": diff.mean().item(), "max_abs_diff": diff.max().item(),
                     "pil_pinned_equal_and_pinned": pinned_same, "pil_img_s": timings["pil"],
                     "pil_pinned_img_s": timings["pil_pinned"], "dali_mixed_img_s": timings["dali"]}
    return out


XL_OVERRIDES = ["data.image_size=256", "model.name=pixeldit-xl", "model.num_classes=10", "distributed.precision=bf16",
                "logging.tensorboard=false", "checkpoint.every_steps=1000000", "data.num_workers=4"]


def variants(strategies: list[str]) -> list[dict]:
    return [{"strategy": s, "activation_checkpointing": ac, "compile": c}
            for s in strategies for ac in ("none", "every") for c in (False, True)]


def planned(variant: dict, memory_gb: float, tflops: float, max_batch: int) -> dict:
    """The plan's largest micro batch for `variant` on one GPU of `memory_gb`, and its memory figures."""
    from pixeldit.jobs.plan import GB, PlanInputs, make_plan, resolve_gpu
    from pixeldit.platform.config import load_config

    cfg = load_config(None, [*XL_OVERRIDES, f"distributed.strategy={variant['strategy']}", "train.global_batch=32",
                             "train.micro_batch=32"])
    plan = make_plan(cfg, PlanInputs(1, resolve_gpu(None, tflops, memory_gb)), strategies=(variant["strategy"],))
    strategy = plan["strategies"][variant["strategy"]]
    mode = strategy["activation_checkpointing"][variant["activation_checkpointing"]]
    batch = min(max_batch or mode["max_micro_batch_memory"], mode["max_micro_batch_memory"])
    per_image = mode["activation_bytes_per_image"] + mode["recompute_bytes_per_image"]
    return {"planned_max_micro_batch": mode["max_micro_batch_memory"], "micro_batch": batch,
            "planned_memory_gb": (strategy["fixed_bytes"] + batch * per_image) / GB}


def train_check(variant: dict, batch: int, steps: int, workdir: str) -> dict:
    from pixeldit.data_pipelines.writer import synthetic_items, write_shards
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    data = os.path.join(workdir, "synthetic256")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        items, classes = synthetic_items(10, 160, 256, 0)  # 1,600 images: several steps an epoch at 391
        write_shards(items, classes, data, shard_samples=128, progress=False)
    name = f"{variant['strategy']}_ac-{variant['activation_checkpointing']}_compile-{variant['compile']}_b{batch}"
    cfg = load_config(None, [*XL_OVERRIDES, f"data.source={data}", f"distributed.strategy={variant['strategy']}",
                             f"train.activation_checkpointing={variant['activation_checkpointing']}",
                             f"train.compile={str(variant['compile']).lower()}", f"train.global_batch={batch}",
                             f"train.micro_batch={batch}", f"train.steps={steps}"])
    trainer = Trainer(cfg, os.path.join(workdir, f"run_{name}"))
    torch.cuda.reset_peak_memory_stats()
    batches = trainer._batches()  # epoch after epoch: at a large micro batch an epoch holds few steps
    times = []
    for _ in range(steps):
        b, _ = next(batches)
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(b)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[2:])[len(times[2:]) // 2]  # the first steps compile and warm the allocator
    images_per_s = batch / step_s
    peak = trainer.monitor.peak
    return {"step_s": step_s, "first_step_s": times[0], "img_s": images_per_s,
            "mfu": images_per_s * trainer.monitor.flops_per_image / (peak * 1e12) if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "device": torch.cuda.get_device_name()}


def train_variant(variant: dict, memory_gb: float, tflops: float, args, workdir: str) -> dict:
    """`variant` at the planned largest micro batch; a quarter less after each out-of-memory error."""
    plan = planned(variant, memory_gb, tflops, args.max_batch)
    batch, tries = plan["micro_batch"], []
    while batch > 0 and len(tries) < 3:
        try:
            return {**variant, **plan, "micro_batch": batch, "out_of_memory_at": tries,
                    **train_check(variant, batch, args.steps, workdir)}
        except torch.cuda.OutOfMemoryError:
            tries.append(batch)
            batch = batch * 3 // 4
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    return {**variant, **plan, "micro_batch": None, "out_of_memory_at": tries}


def bench_script(name: str, *args: str) -> dict:
    """Run one bench/ script on the GPU and keep its printed table and JSON figures."""
    import subprocess
    out = os.path.join(tempfile.mkdtemp(prefix=name), "figures.json")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, f"{name}.py"), *args, "--device", "cuda",
                           "--json", out], capture_output=True, text=True, timeout=900)
    figures = json.load(open(out)) if os.path.exists(out) else {}
    return {"returncode": proc.returncode, "stdout": proc.stdout[-4000:], "stderr": proc.stderr[-2000:],
            "figures": figures}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=None, help="cap on the planned micro batch (time)")
    parser.add_argument("--strategies", default="fsdp,zero2")
    parser.add_argument("--only", default=None, help="comma-separated parts: dali,train,repa,sample (default all)")
    parser.add_argument("--plan-only", action="store_true", help="print the train variants and planned batches")
    parser.add_argument("--memory-gb", type=float, default=141.0, help="with --plan-only: the GPU's memory")
    parser.add_argument("--tflops", type=float, default=989.0, help="with --plan-only: the GPU's bf16 peak")
    parser.add_argument("--json", default="gpu_check.json")
    args = parser.parse_args()
    parts = set((args.only or "dali,train,repa,sample").split(","))
    if args.plan_only:
        for variant in variants(args.strategies.split(",")):
            print(json.dumps({**variant, **planned(variant, args.memory_gb, args.tflops, args.max_batch)}))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --plan-only)", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "torch_extensions"))
    workdir = tempfile.mkdtemp(prefix="gpu_check_")
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    report = {"train": []}

    def keep(key, value):
        if key == "train":
            report["train"].append(value)
        else:
            report[key] = value
        print(key, json.dumps(value), flush=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if "dali" in parts:
        keep("dali", dali_check(workdir))
    for variant in variants(args.strategies.split(",")) if "train" in parts else ():
        keep("train", train_variant(variant, memory_gb, args.tflops, args, workdir))
    if "repa" in parts:
        keep("repa", bench_script("repa", "--model", "pixeldit-b", "--batch", "32", "--steps", "5", "--bf16"))
    if "sample" in parts:
        keep("sample", bench_script("sample", "--runs", "pixeldit-xl@256:32:10", "--dtype", "bf16"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
