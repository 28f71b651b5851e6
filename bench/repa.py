"""REPA cost: train-step time with online DINOv2 targets vs cached ones, and the cache job's images/s.

    python bench/repa.py --model pixeldit-b --resolution 256 --batch 2
    python bench/repa.py --encoder /path/dinov2_vitb14_pretrain.pth   # + flip-grid cosine, real weights

Both arms run the same PixelDiT step (forward with the block-8 hidden state,
projector, velocity + REPA loss, backward, AdamW) on the same batch; the online
arm also runs the frozen encoder on the batch, the cached arm decodes fp16
targets (what the loader hands over). The ratio cached / online is measured in
this run, alternating arms so machine noise hits both. Without --encoder the
encoder has DINOv2-B's shape and random weights: timings are exact, the flip
cosine is not meaningful and is not printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from _common import machine, median, sync, write_json
from pixeldit.data_pipelines.features import FeatureManifest, decode, encode, mirror_grid
from pixeldit.diffusion import repa_loss, velocity_loss
from pixeldit.models import PRESETS, build_model, build_projector
from pixeldit.models.dinov2 import load_dinov2


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pixeldit-b", choices=sorted(PRESETS))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm")
    ap.add_argument("--encoder", default=None, help="DINOv2 weights (default: random weights of DINOv2-B's shape)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast the step and run the encoder in bf16, as on GPUs")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def random_dinov2_b(path: str):
    from pixeldit.models.dinov2 import build_timm_vit
    torch.save(build_timm_vit(768, 12, 12, 4.0, False, 224).state_dict(), path)
    return path


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    torch.manual_seed(0)
    weights = args.encoder or random_dinov2_b(tempfile.mktemp(suffix=".pth"))
    encoder = load_dinov2(weights, args.resolution, device, torch.bfloat16 if args.bf16 else torch.float32)
    model = build_model(args.model, num_classes=1000, patch_size=16).to(device)
    projector = build_projector(model.arch.hidden_size, encoder.dim).to(device)
    params = list(model.parameters()) + list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    B, S = args.batch, args.resolution
    images = torch.rand(B, 3, S, S, device=device) * 2 - 1
    labels = torch.randint(0, 1000, (B,), device=device)
    manifest = FeatureManifest([], encoder.name, weights, "", S, encoder.input_size, encoder.tokens, encoder.dim,
                               "fp16", "none", "")
    stored = [encode(t, "fp16") for t in encoder(images)]

    def step(targets_fn):
        targets = targets_fn()
        t = torch.rand(B, device=device)
        noise = torch.randn_like(images)
        x_t = t.view(-1, 1, 1, 1) * images + (1 - t.view(-1, 1, 1, 1)) * noise
        with autocast:
            v, hidden = model.forward_with_hidden(x_t, t, labels, min(8, model.arch.patch_depth))
            projected = projector(hidden)
        loss = velocity_loss(v, images - noise) + 0.5 * repa_loss(projected, targets).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    arms = {
        "online": lambda: encoder(images),
        "cached": lambda: torch.stack([decode(files, manifest, False, "bench") for files in stored]).to(device).float(),
    }
    times = {name: [] for name in arms}
    for name in arms:  # warm-up
        step(arms[name])
    for _ in range(args.steps):
        for name, fn in arms.items():
            start = time.perf_counter()
            step(fn)
            sync(device)
            times[name].append(time.perf_counter() - start)
    enc_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        encoder(images)
        sync(device)
        enc_times.append(time.perf_counter() - start)
    online, cached = median(times["online"]), median(times["cached"])
    print(f"{args.model} {S}px batch {B}, DINOv2 {encoder.name} ({encoder.input_size}px input), "
          f"{args.device}{' bf16' if args.bf16 else ''}, {torch.get_num_threads()} threads")
    print(f"  step online   {online:.3f} s")
    print(f"  step cached   {cached:.3f} s   cached/online = {cached / online:.3f}")
    print(f"  encoder alone {median(enc_times):.3f} s/batch = {B / median(enc_times):.2f} img/s "
          f"(the cache job's compute bound here)")
    figures = {"online_s": online, "cached_s": cached, "ratio": cached / online,
               "encoder_img_s": B / median(enc_times)}
    if args.encoder:
        cos = F.cosine_similarity(torch.stack([mirror_grid(t) for t in encoder(images)]),
                                  encoder(images.flip(-1)), dim=-1)
        print(f"  flip=grid: cosine of mirrored-grid to true flipped features: mean {cos.mean():.4f}, "
              f"min {cos.min():.4f}")
        figures["grid_flip_cosine_mean"] = cos.mean().item()
    if args.json:
        write_json(args.json, {"machine": machine(device), "args": vars(args), **figures})


if __name__ == "__main__":
    main()
