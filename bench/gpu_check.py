"""Every GPU-only check in one script: run it once on a GPU machine and keep its JSON.

    torchrun --nproc-per-node 1 bench/gpu_check.py --json gpu_check.json

1. DALI `mixed` decode of real photographs vs the CPU decoders (same keys, pixel agreement, img/s);
   the pil decoder's decode processes with batches copied into pinned memory on a CUDA host
   (same pixels as on CPU, pinned).
2. PixelDiT-XL bf16 train steps at 256², batch 32 per GPU, under fsdp and zero2 (same trainer code
   as CPU runs): img/s, MFU against the device's bf16 peak, peak memory.
3. REPA: PixelDiT-B bf16 step with online DINOv2-B targets vs cached ones (bench/repa.py on cuda),
   and the encoder's img/s (the cache job's bound).
4. Sampling: images/s and evaluations per image of each sampler, PixelDiT-XL 256² bf16, 10 steps
   (bench/sample.py on cuda).
It needs a CUDA device; on a CPU-only machine it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def dali_check(workdir: str) -> dict:
    from pixeldit.data_pipelines.loader import LoaderSpec, ShardLoader
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


def train_check(strategy: str, steps: int, batch: int, workdir: str) -> dict:
    from pixeldit.data_pipelines.writer import synthetic_items, write_shards
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    data = os.path.join(workdir, "synthetic256")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        items, classes = synthetic_items(10, 64, 256, 0)
        write_shards(items, classes, data, shard_samples=128, progress=False)
    cfg = load_config(None, [f"data.source={data}", "data.image_size=256", "model.name=pixeldit-xl",
                             "model.num_classes=10", f"distributed.strategy={strategy}", "distributed.precision=bf16",
                             f"train.global_batch={batch}", f"train.micro_batch={batch}", "logging.tensorboard=false",
                             f"train.steps={steps}", "checkpoint.every_steps=1000000", "data.num_workers=4"])
    trainer = Trainer(cfg, os.path.join(workdir, f"run_{strategy}"))
    torch.cuda.reset_peak_memory_stats()
    batches = iter(trainer.loader)
    times = []
    for _ in range(steps):
        b = next(batches)
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(b)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    images_per_s = batch / step_s
    peak = trainer.monitor.peak
    return {"step_s": step_s, "img_s": images_per_s,
            "mfu": images_per_s * trainer.monitor.flops_per_image / (peak * 1e12) if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "device": torch.cuda.get_device_name()}


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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--strategies", default="fsdp,zero2")
    parser.add_argument("--skip-dali", action="store_true")
    parser.add_argument("--json", default="gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "torch_extensions"))
    workdir = tempfile.mkdtemp(prefix="gpu_check_")
    report = {}
    if not args.skip_dali:
        report["dali"] = dali_check(workdir)
        print(json.dumps(report["dali"], indent=1), flush=True)
    for strategy in args.strategies.split(","):
        report[strategy] = train_check(strategy, args.steps, args.batch, workdir)
        print(strategy, json.dumps(report[strategy]), flush=True)
    report["repa"] = bench_script("repa", "--model", "pixeldit-b", "--batch", "32", "--steps", "5", "--bf16")
    print(report["repa"]["stdout"], flush=True)
    report["sample"] = bench_script("sample", "--runs", "pixeldit-xl@256:32:10", "--dtype", "bf16")
    print(report["sample"]["stdout"], flush=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
