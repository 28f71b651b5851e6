"""`pixeldit <verb>`: the platform's command line.

Each verb parses its own arguments and imports its heavy modules lazily, so
`pixeldit info` answers in a second and a bad flag fails before torch loads.
"""

from __future__ import annotations

import argparse
import sys


def _add_config_args(parser: argparse.ArgumentParser):
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded demo config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=5e-5 (repeatable)")


def cmd_info(args) -> int:
    import torch

    from pixeldit.models import build_model, build_projector, forward_flops, resolve_arch

    overrides = {}
    for item in args.overrides:
        key, _, raw = item.partition("=")
        import yaml
        overrides[key] = yaml.safe_load(raw)
    arch = resolve_arch(args.model, **overrides)
    with torch.device("meta"):
        model = build_model(args.model, **overrides)
        projector = build_projector(arch.hidden_size, args.encoder_dim)
    groups = model.parameter_groups()
    flops = forward_flops(arch, args.resolution, args.resolution)
    tokens = (args.resolution // arch.patch_size) ** 2
    print(f"model            {args.model}  ({arch.variant}, pixel AdaLN: {arch.pixel_adaln}, "
          f"post-modulation: {arch.post_modulation})")
    print(f"layers           {arch.patch_depth} patch blocks x D={arch.hidden_size}, {arch.num_heads} heads; "
          f"{arch.pixel_depth if arch.variant == 'pixeldit' else 0} PiT blocks x D_pix={arch.pixel_hidden_size}; "
          f"patch {arch.patch_size}")
    print(f"parameters       {groups['total'] / 1e6:.2f}M total")
    print(f"  patch pathway  {groups['patch'] / 1e6:.2f}M (embedders + patch blocks)")
    print(f"  pixel pathway  {groups['pixel'] / 1e6:.2f}M (pixel embedder + PiT blocks + output)")
    print(f"  REPA projector {sum(p.numel() for p in projector.parameters()) / 1e6:.2f}M (not part of the model)")
    print(f"resolution       {args.resolution}x{args.resolution}: {tokens} patch tokens, "
          f"{args.resolution ** 2} pixel tokens")
    print(f"forward          {flops['total'] / 1e9:.1f} GFLOPs/image "
          f"(patch {flops['patch'] / 1e9:.1f}, pixel {flops['pixel'] / 1e9:.1f})")
    print(f"training         {3 * flops['total'] / 1e9:.1f} GFLOPs/image (forward + backward = 3x forward)")
    return 0


def cmd_config(args) -> int:
    from pixeldit.platform.config import load_config

    cfg = load_config(args.config, args.overrides)
    text = cfg.to_yaml()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixeldit", description="PixelDiT training platform")
    verbs = parser.add_subparsers(dest="verb", required=True)

    info = verbs.add_parser("info", help="parameters and FLOPs of a model")
    info.add_argument("model", help="pixeldit-b | pixeldit-l | pixeldit-xl | pixeldit-tiny | pixeldit-small")
    info.add_argument("--resolution", type=int, default=256)
    info.add_argument("--encoder-dim", type=int, default=768, help="REPA target width (768: DINOv2-B)")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="architecture override, e.g. --set variant=dit")
    info.set_defaults(func=cmd_info)

    config = verbs.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(config)
    config.add_argument("--out", default=None, help="write the YAML here instead of printing it")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        # bad input is the user's to fix: one clear line, no traceback
        message = e.args[0] if e.args else str(e)
        print(f"pixeldit {args.verb}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
