"""`pixeldit <verb>`: the platform's command line.

Each verb parses its own arguments and imports its heavy modules lazily, so
`pixeldit info` answers in a second and a bad flag fails before torch loads.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

from pixeldit.jobs.argument_types import positive_float, positive_int


def _add_config_args(parser: argparse.ArgumentParser):
    parser.add_argument("--config", default=None,
                        help="YAML config (default: the embedded demo config); a relative path that is not found "
                             "from the working directory is looked up among the shipped configs, so "
                             "configs/imagenet256/pixeldit_xl.yaml or imagenet256/pixeldit_xl.yaml work from any "
                             "folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set schedule.stages[0].lr=5e-5 or "
                             "--set train.steps=100 (repeatable)")


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



def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: an MFU is a fraction in (0, 1], e.g. 0.4")
    return value


def _parse_size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    text = text.strip().lower().rstrip("b")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def cmd_shards(args) -> int:
    from pixeldit.data_pipelines import writer
    from pixeldit.data_pipelines.manifest import ImagePolicy
    from pixeldit.data_pipelines.verify import verify_shards

    if args.action == "verify":
        problems = verify_shards(args.url, decode=args.decode)
        for line in problems:
            print(line)
        print(f"{args.url}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if args.action == "index":
        from pixeldit.data_pipelines.index_shards import run_index_command
        return run_index_command(args)
    if args.action == "synthetic":
        items, classes = writer.synthetic_items(args.classes, args.per_class, args.size, args.seed)
        policy = ImagePolicy(mode="original", size=args.size, format="png")
        source = f"synthetic:{args.classes}x{args.per_class}@{args.size}"
    else:
        lister = writer.list_file_list if args.src.endswith((".txt", ".tsv", ".lst")) else writer.list_image_folder
        items, classes = lister(args.src)
        policy = ImagePolicy(mode="adm" if args.size else "original", size=args.size, format=args.format,
                             quality=args.quality)
        source = args.src
    shard_bytes = _parse_size(args.shard_size) if args.shard_size else None
    manifest = writer.write_shards(items, classes, args.dst, policy=policy, shard_samples=args.shard_samples,
                                   shard_bytes=shard_bytes, workers=args.workers, seed=args.seed, source=source)
    print(f"{args.dst}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
          f"{len(manifest.skipped)} skipped")
    return 0


def cmd_train(args) -> int:
    import logging

    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg, args.run_dir)
        state = trainer.fit()
    except KeyboardInterrupt:
        # a Ctrl-C before training began, or the second one (the first saves and stops: Trainer.fit);
        # one line instead of a traceback, and the shell's code for an interrupt
        print("pixeldit train: aborted (Ctrl-C): nothing saved since the last checkpoint", file=sys.stderr,
              flush=True)
        return 130
    if trainer.already_complete:
        return 0  # the trainer's one line said so; nothing was trained, so no summary
    if trainer.rank == 0:
        run = os.path.abspath(trainer.run_dir)
        if trainer.stopped_by:
            print(f"stopped at step {state.step} of {cfg.train.steps} on request ({trainer.stopped_by}), "
                  f"checkpoint saved; the same command resumes from it ({run})")
        else:
            print(f"trained {state.step} steps ({state.skipped} skipped) in {run}")
        root = trainer.checkpoint_root if "://" in trainer.checkpoint_root else os.path.abspath(trainer.checkpoint_root)
        print(f"  checkpoints   {root} (pixeldit export {run} model.safetensors)")
        if cfg.logging.tensorboard:
            print(f"  tensorboard   tensorboard --logdir {os.path.join(run, 'tensorboard')}")
        if cfg.logging.wandb:
            print(f"  wandb         project {cfg.logging.wandb_project} "
                  f"(offline: wandb sync {os.path.join(run, 'wandb', 'offline-run-*')})")
        if trainer.last_preview:
            print(f"  EMA samples   {os.path.abspath(trainer.last_preview)} (one row per class)")
    return 0


def cmd_export(args) -> int:
    from pixeldit.platform.export import export_checkpoint

    meta = export_checkpoint(args.checkpoint, args.out)
    print(f"{args.out}: step {meta['step']} ({meta['strategy']}) with ema., model. and projector. weights")
    return 0


def _newest_saved_step(cfg, run_dir: str | None) -> tuple[int, bool] | None:
    """(step, whether a requested stop saved it) of the run's newest complete checkpoint (every rank's
    files and the commit marker), None when there is none yet."""
    from pixeldit import storage
    from pixeldit.errors import CheckpointError
    from pixeldit.parallel import checkpoint

    c = cfg.checkpoint
    root = (c.dir or os.path.join(run_dir or cfg.train.run_dir, "checkpoints")).rstrip("/")
    storage.register_root(root, {"endpoint_url": c.endpoint_url} if c.endpoint_url else {})
    try:
        found = checkpoint.latest_complete(root)
    except CheckpointError:  # a damaged run directory; the trainers' own output says what is wrong
        return None
    return (found[1]["step"], bool(found[1].get("stop_save"))) if found else None


def cmd_launch(args) -> int:
    import shlex
    import subprocess

    from pixeldit import launchers

    launch, train, cfg = _checked_launch(args)
    if args.launcher == "slurm":
        print(launchers.slurm_script(launch, partition=args.partition, time_limit=args.time), end="")
        return 0
    if args.launcher == "torchrun":
        cmd = launchers.torchrun(launch, rendezvous=args.rdzv)
    else:
        cmd = launchers.deepspeed(launch, hostfile=args.hostfile, no_ssh=args.no_ssh)
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.print_only:
        return 0
    env = dict(os.environ, PIXELDIT_DEBUG="1") if debug_enabled(args) else None
    newest_saved = functools.partial(_newest_saved_step, cfg, train.run_dir)
    saved_at_start = newest_saved()
    process = subprocess.Popen(cmd, env=env)
    return _wait_for_training(process, args.launcher, newest_saved, saved_at_start)


def _checked_launch(args):
    """The Launch, the launched `train`'s arguments and the config they load, checked here: a batch the
    ranks cannot share fails in this terminal, not minutes into an allocation."""
    from pixeldit import launchers
    from pixeldit.platform.config import load_config

    train_args = list(args.train_args)
    if debug_enabled(args) and "--debug" not in train_args:
        # on the command line of every rank, so it reaches ranks on other nodes too (pdsh, srun)
        train_args.insert(0, "--debug")
    launch = launchers.resolve_launch(args.launcher, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                                      node_rank=args.node_rank, master_addr=args.master_addr,
                                      master_port=args.master_port, hostfile=args.hostfile, train_args=train_args)
    train = build_parser().parse_args(["train", *train_args])
    cfg = load_config(train.config, train.overrides)
    cfg.train.layout(launch.world, per_node=launch.nproc_per_node)
    return launch, train, cfg


def _wait_for_training(process, launcher: str, newest_saved_step, saved_at_start) -> int:
    """The launcher's exit code, or 0 when a Ctrl-C stopped a run whose every rank saved."""
    import signal

    from pixeldit import launchers

    interrupts = 0
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:
            # the launcher passes the Ctrl-C on and the training processes save and exit: wait for them
            # rather than kill the launcher under them
            interrupts += 1
            if interrupts == 1:
                print("pixeldit launch: Ctrl-C: waiting for the training processes to save and exit "
                      "(Ctrl-C again aborts them)", file=sys.stderr, flush=True)
            elif launcher == "torchrun":
                # torchrun starts each worker in a session of its own and passes on only the first
                # Ctrl-C; the second aborts the workers, as it does a plain `pixeldit train`
                for pid in launchers.child_pids(process.pid):
                    os.kill(pid, signal.SIGINT)
    if code != 0 and interrupts:
        # torchrun re-raises the stop signal after its workers have exited, so it ends with 1 even when
        # every rank saved; a complete checkpoint of this launch that a stop saved is that save
        saved = newest_saved_step()
        if saved is not None and saved != saved_at_start and saved[1]:
            print(f"pixeldit launch: stopped on Ctrl-C at step {saved[0]}, every rank saved; the same command "
                  f"resumes from it", file=sys.stderr, flush=True)
            return 0
    return 128 - code if code < 0 else code


def cmd_sample(args) -> int:
    from pixeldit.jobs.sample import run_sample_command
    return run_sample_command(args)


def cmd_evaluate(args) -> int:
    from pixeldit.jobs.evaluate import run_evaluate_command
    return run_evaluate_command(args)


def cmd_repa_cache(args) -> int:
    from pixeldit.jobs.repa_cache import run_repa_cache_command
    return run_repa_cache_command(args)


def cmd_plan(args) -> int:
    import json

    from pixeldit.platform.config import load_config
    from pixeldit.jobs.plan import PlanInputs, format_plan, make_plan, resolve_gpu

    cfg = load_config(args.config, args.overrides)
    given = {"mfu": args.mfu, "price_per_gpu_hour": args.price_per_gpu_hour, "storage_gbps": args.storage_gbps}
    gpu = resolve_gpu(args.gpu, args.tflops, args.memory_gb, args.internode_gbps, args.gpus_per_node)
    inputs = PlanInputs(gpus=args.gpus, gpu=gpu,
                        **{key: value for key, value in given.items() if value is not None})
    plan = make_plan(cfg, inputs)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def package_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("pixeldit")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed: pip install -e .)"


DEBUG_HELP = "show the full traceback of user errors too (or set PIXELDIT_DEBUG=1)"


def _debug_parent() -> argparse.ArgumentParser:
    """--debug for every verb, so it works after the verb as well as before it; SUPPRESS keeps a verb's
    parser from overwriting a --debug given before the verb with its own default."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parent


def add_verb(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, parents=[_debug_parent()], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixeldit", description="PixelDiT training platform")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True)
    # in the order `pixeldit --help` lists them
    for add in (_add_info, _add_train, _add_launch, _add_export, _add_sample_evaluate_repa_cache, _add_plan,
                _add_config, _add_shards):
        add(verbs)
    return parser


def _add_info(verbs):
    info = add_verb(verbs, "info", help="parameters and FLOPs of a model")
    info.add_argument("model", help="pixeldit-b | pixeldit-l | pixeldit-xl | pixeldit-tiny | pixeldit-small")
    info.add_argument("--resolution", type=int, default=256)
    info.add_argument("--encoder-dim", type=int, default=768, help="REPA target width (768: DINOv2-B)")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="architecture override, e.g. --set variant=dit")
    info.set_defaults(func=cmd_info)


def _add_train(verbs):
    train = add_verb(verbs, "train", help="train (resumes from the run directory's latest checkpoint)")
    _add_config_args(train)
    train.add_argument("--run-dir", default=None, help="override train.run_dir")
    train.set_defaults(func=cmd_train)


def _add_launch(verbs):
    launch = add_verb(verbs, "launch", help="build (and run) a torchrun / deepspeed / SLURM launch of `train`",
                              description="pixeldit launch LAUNCHER [options] -- TRAIN ARGUMENTS: the config and "
                                          "--set overrides after `--` are loaded and the batch layout checked "
                                          "against nodes x processes before anything starts")
    launch.add_argument("launcher", choices=["torchrun", "deepspeed", "slurm"])
    launch.add_argument("--nnodes", type=int, default=None,
                        help="nodes (default: the hostfile's host count for deepspeed, else 1)")
    launch.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes (GPUs) per node (default: the hostfile's slots for deepspeed, else 1)")
    launch.add_argument("--node-rank", type=int, default=0)
    launch.add_argument("--master-addr", default=None,
                        help="address of node 0 (default: the hostfile's first host for deepspeed; 127.0.0.1 "
                             "for one node; required for multi-node torchrun)")
    launch.add_argument("--master-port", type=int, default=29500)
    launch.add_argument("--rdzv", choices=["static", "c10d"], default="static", help="torchrun rendezvous")
    launch.add_argument("--hostfile", default=None, help="deepspeed hostfile (pdsh launch from node 0)")
    launch.add_argument("--no-ssh", action="store_true", help="deepspeed: run this node only (--node-rank)")
    launch.add_argument("--partition", default=None, help="slurm partition")
    launch.add_argument("--time", default="04:00:00", help="slurm time limit")
    launch.add_argument("--print", dest="print_only", action="store_true", help="print the command, do not run it")
    launch.set_defaults(func=cmd_launch)


def _add_export(verbs):
    export = add_verb(verbs, "export", help="consolidate a checkpoint into one safetensors file")
    export.add_argument("checkpoint", help="run directory, checkpoints folder or step_NNNNNNNN folder")
    export.add_argument("out", help="output .safetensors")
    export.set_defaults(func=cmd_export)


def _add_sample_evaluate_repa_cache(verbs):
    """The verbs whose arguments live beside their jobs."""
    from pixeldit.jobs.repa_cache_arguments import add_repa_cache_arguments
    from pixeldit.jobs.evaluate_arguments import add_evaluate_arguments
    from pixeldit.jobs.sample_arguments import add_sample_arguments
    sample = add_verb(verbs, "sample", help="sample images to an ADM .npz (one process or many under torchrun)")
    add_sample_arguments(sample)
    sample.set_defaults(func=cmd_sample)

    evaluate = add_verb(verbs, "evaluate", help="FID / sFID / IS / precision-recall of samples against a reference")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    repa = add_verb(verbs, "repa-cache", help="DINOv2 feature shards mirroring image shards (REPA targets)")
    add_repa_cache_arguments(repa)
    repa.set_defaults(func=cmd_repa_cache)


def _add_plan(verbs):
    plan = add_verb(verbs, "plan", help="memory per rank, micro batch, time, cost, checkpoint and data rates "
                                         "of a config on N GPUs, per strategy (docs/planning.md)")
    _add_config_args(plan)
    plan.add_argument("--gpus", type=positive_int, required=True, help="GPUs (ranks) in the run")
    plan.add_argument("--gpu", default=None, help="a100-40gb | a100-80gb (a100) | h100 | h200 | b200")
    plan.add_argument("--tflops", type=positive_float, default=None,
                      help="peak dense bf16 TFLOP/s per GPU (another GPU kind, or overriding --gpu's)")
    plan.add_argument("--memory-gb", type=positive_float, default=None, help="memory per GPU in GB")
    plan.add_argument("--internode-gbps", type=positive_float, default=None,
                      help="network bandwidth per GPU between nodes in GB/s (default: the kind's, 50 on H100/H200)")
    plan.add_argument("--gpus-per-node", type=positive_int, default=None,
                      help="GPUs sharing one NVLink domain (default 8); past it rings run over the network")
    plan.add_argument("--mfu", type=_fraction, default=None,
                      help="model FLOPs utilisation assumed for the step time (default 0.40, printed)")
    plan.add_argument("--price-per-gpu-hour", type=positive_float, default=None, help="for the run's cost")
    plan.add_argument("--storage-gbps", type=positive_float, default=None,
                      help="checkpoint write bandwidth in GB/s (default 1.0, printed)")
    plan.add_argument("--json", action="store_true", help="the plan as JSON")
    plan.set_defaults(func=cmd_plan)


def _add_config(verbs):
    config = add_verb(verbs, "config", help="print the resolved config as YAML")
    _add_config_args(config)
    config.add_argument("--out", default=None, help="write the YAML here instead of printing it")
    config.set_defaults(func=cmd_config)


def _add_shards(verbs):
    shards = add_verb(verbs, "shards", help="write, verify, index or synthesise WebDataset shards")
    actions = shards.add_subparsers(dest="action", required=True)
    _add_shards_write_and_synthetic(actions)
    verify = add_verb(actions, "verify", help="check a manifest against its shards")
    verify.add_argument("url")
    verify.add_argument("--decode", action="store_true", help="also decode every image")
    _add_shards_index(actions)
    shards.set_defaults(func=cmd_shards)


def _add_shards_write_and_synthetic(actions):
    write = add_verb(actions, "write", help="SRC (class folders or a 'path label' list) -> DST shards")
    write.add_argument("src")
    write.add_argument("dst", help="local folder or fsspec URL (s3://bucket/prefix, gs://...)")
    write.add_argument("--size", type=int, default=None, help="ADM centre crop to SIZE x SIZE (default: keep originals)")
    write.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"], help="format of re-encoded images")
    write.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    synth = add_verb(actions, "synthetic", help="a small class-conditional demo set (coloured shapes)")
    synth.add_argument("dst")
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--per-class", type=int, default=100)
    synth.add_argument("--size", type=int, default=32)
    for p in (write, synth):
        p.add_argument("--shard-samples", type=int, default=None, help="samples per shard (default 1000)")
        p.add_argument("--shard-size", default=None, help="target bytes per shard, e.g. 500MB")
        p.add_argument("--workers", type=int, default=0, help="decode/encode processes")
        p.add_argument("--seed", type=int, default=0, help="seed of the sample order")


def _add_shards_index(actions):
    index = add_verb(actions, "index", help="manifest + DALI indexes for existing WebDataset shards (no rewrite)")
    index.add_argument("pattern", metavar="URL_PREFIX_OR_BRACE_PATTERN",
                       help="s3://b/train-{000000..000099}.tar, a folder, or a name prefix (its *.tar files)")
    index.add_argument("--out", default=None,
                       help="write manifest, indexes and records here, not beside the shards (read-only source)")
    index.add_argument("--workers", type=int, default=0, help="shards read and decoded in parallel processes")
    index.add_argument("--label-key", action="append", default=None, metavar="cls|json:FIELD",
                       help="where the label is, first match wins (repeatable; default: cls, json:label, json:cls)")
    index.add_argument("--num-classes", type=int, default=None,
                       help="labels must be below this (default: the largest label found + 1)")
    index.add_argument("--io-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="deadline of each storage read or write, retries included (as data.io_timeout_s)")


def debug_enabled(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("PIXELDIT_DEBUG", "") not in ("", "0")


def report_user_error(verb: str, error: BaseException) -> str:
    """One line on stderr; under torchrun also its per-rank error file, so its failure summary shows the line."""
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    line = f"pixeldit {verb}{where}: error: {error}"
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time
        # torchelastic's error-file layout; without a py_callstack its summary prints the message itself
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    return line


def _embeddings(argv: list[str], tokens: list[str], end: int | None = None):
    """Every way `tokens` sits in `argv` as an ordered subsequence (index tuples), rightmost first: the
    train arguments of a forgotten `--` usually close the command line."""
    end = len(argv) if end is None else end
    if not tokens:
        yield ()
        return
    for i in range(end - 1, len(tokens) - 2, -1):
        if argv[i] == tokens[-1]:
            for head in _embeddings(argv, tokens[:-1], i):
                yield (*head, i)


def _launcher_arguments(parser, argv: list[str], unknown: list[str], args) -> list[str]:
    """`argv` without the tokens argparse did not recognise, found by position: the same text can also be
    one of the launcher's own values (`--nnodes 2 ... --workers 2`). A candidate is the one whose remaining
    arguments parse to the same launcher options with nothing left over."""
    import contextlib
    import io
    first = None
    for positions in itertools.islice(_embeddings(argv, unknown), 64):
        rest = [token for i, token in enumerate(argv) if i not in positions]
        first = first or rest
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                again, left = parser.parse_known_args(rest)
        except SystemExit:  # argparse refused this split
            continue
        if not left and vars(again) == vars(args):
            return rest
    return first or list(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `pixeldit launch ... -- <train arguments>`: everything after -- belongs to the launched train
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.verb == "launch":
        # a forgotten `--`: the train arguments were read as the launcher's own
        rest = _launcher_arguments(parser, argv, unknown, args)
        print(f"pixeldit launch: error: unrecognized arguments: {' '.join(unknown)}; put the train arguments "
              f"after `--`: pixeldit {' '.join(rest)} -- {' '.join([*unknown, *train_args])}", file=sys.stderr)
        return 2
    if unknown:
        parser.parse_args(argv)  # argparse's own message and exit
    args.train_args = train_args
    from pixeldit.errors import PixelDiTError
    try:
        return args.func(args)
    except PixelDiTError as e:
        # the user's to fix: one line naming the problem and the fix; the traceback only when asked
        if debug_enabled(args):
            raise
        report_user_error(args.verb, e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
