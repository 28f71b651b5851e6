"""`pixeldit plan`: what a training run will cost, from the config alone, before renting GPUs.

Everything here is arithmetic on the config, the model's parameter shapes (built on the meta
device, so XL costs nothing) and a few stated assumptions (GPU kind, MFU, storage bandwidth).
Four kinds of figures, kept apart so each can be checked on its own:

- state bytes per rank (parameters, gradients, AdamW moments, fp32 masters, EMA fragments):
  exact, following each strategy's own layout and padding rules (FSDP2's dim-0 row chunks,
  DeepSpeed's flat buffer aligned to 2 x world for ZeRO-1/2, per-parameter ceil(numel / world)
  partitions and resident small parameters for ZeRO-3); tests/test_plan.py counts them on live
  strategy objects and asserts equality;
- activations: the tensors autograd saves for backward, counted per block from the model's code
  (docs/planning.md lists the terms), checked against saved-tensor hooks;
- transient buffers (all-gathered bf16 blocks, reduce buckets, the recomputed block under
  activation checkpointing): the largest thing alive at once, an estimate stated as such;
- time: compute at an assumed MFU, communication at the slower link the rings cross (NVLink inside
  a node, the inter-node network beyond it), the step the longer of the two (full overlap assumed).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..models.flops import forward_flops, training_flops
from ..models.layers import swiglu_hidden
from ..platform.batch_layout import batch_layout
from ..parallel.spec import STRATEGIES

GB = 1e9


@dataclass(frozen=True)
class GPUKind:
    name: str
    bf16_tflops: float      # peak dense bf16 tensor-core TFLOP/s (no sparsity)
    memory_gb: float        # HBM, decimal GB as on the datasheet
    interconnect_gbps: float  # GPU-to-GPU bandwidth per GPU inside a node (NVLink), GB/s, all links together
    internode_gbps: float     # network bandwidth per GPU between nodes (its NIC), GB/s
    gpus_per_node: int = 8    # GPUs behind one NVLink domain


# NVIDIA datasheet figures, SXM parts; the network is the reference systems' (DGX A100: one 200 Gb/s
# HDR NIC per GPU, DGX H100 / H200 / B200: one 400 Gb/s NDR NIC per GPU); docs/planning.md
GPU_KINDS = {
    "a100-40gb": GPUKind("a100-40gb", 312.0, 40.0, 600.0, 25.0),
    "a100-80gb": GPUKind("a100-80gb", 312.0, 80.0, 600.0, 25.0),
    "h100": GPUKind("h100", 989.0, 80.0, 900.0, 50.0),
    "h200": GPUKind("h200", 989.0, 141.0, 900.0, 50.0),
    "b200": GPUKind("b200", 2250.0, 180.0, 1800.0, 50.0),
}
GPU_ALIASES = {"a100": "a100-80gb"}

# Assumptions, each printed with the plan (docs/planning.md says why these values)
DEFAULT_MFU = 0.40
USABLE_MEMORY_FRACTION = 0.90      # CUDA context, NCCL buffers and allocator fragmentation take the rest
DEFAULT_STORAGE_GBPS = 1.0         # checkpoint writes to object storage, per job (GB/s)
ASSUMED_JPEG_BYTES_256 = 110_000   # a 256x256 ADM-cropped ImageNet JPEG at quality 95, when no manifest is read
# the manifest read is best effort: an unreachable bucket (an offline laptop, a placeholder URL) must not
# hold the plan for data.io_timeout_s
MANIFEST_DEADLINE_S = 10.0
LOADER_PREFETCH = 2                # ShardLoader's prefetch, as build_loader leaves it
DDP_BUCKET_FACTOR = 1              # DDP's reducer keeps one fp32 copy of all gradients in its buckets
DS_REDUCE_BUCKET = 500_000_000     # DeepSpeed's default reduce_bucket_size (elements)
DS_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold (elements)
DINO_PATCH = 14
IMAGENET_TRAIN_IMAGES = 1_281_167  # the REPA cache's total size when no manifest gives the count
REPA_CACHE_BYTES_PER_VALUE = 2     # `pixeldit repa-cache` writes fp16 by default (bf16 the same size)
BF16_BYTES_PER_SAVED_ELEMENT = 2.3


# ---------------------------------------------------------------- parameter shapes


def parameter_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every trained parameter in TrainModule order (model, then projector)."""
    import torch

    from ..models import build_model

    arch = cfg.model.arch()
    with torch.device("meta"):
        model = build_model(cfg.model.name, **cfg.model.overrides())
        shapes = [(f"model.{n}", tuple(p.shape)) for n, p in model.named_parameters()]
        projector = cfg.repa.kind().build_projector(arch.hidden_size, cfg.repa.encoder_dim)
        if projector is not None:
            shapes += [(f"projector.{n}", tuple(p.shape)) for n, p in projector.named_parameters()]
    return shapes


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _fsdp_rows(shape, world: int, rank: int) -> tuple[int, int]:
    """(rows this rank holds, rows of its padded chunk): FSDP2 shards dim 0 in ceil(d0 / world) chunks."""
    d0 = shape[0] if shape else 1
    chunk = -(-d0 // world)
    return max(0, min(d0, (rank + 1) * chunk) - rank * chunk), chunk


def _zero3_partition(numel: int, world: int, rank: int) -> tuple[int, int]:
    """(real elements this rank holds, its partition size): ceil(numel / world) per rank, padded."""
    part = -(-numel // world)
    return max(0, min(numel - rank * part, part)), part


# ---------------------------------------------------------------- state per rank


def state_bytes(shapes, strategy: str, world: int, rank: int, bf16: bool) -> dict[str, int]:
    """Persistent bytes this rank holds between steps (plus gradients, alive from backward to step).

    Keys: params (the weights the forward reads, in their resident dtype), masters (a separate
    fp32 copy, ZeRO only), grads, moments (AdamW exp_avg + exp_avg_sq), ema (fp32 fragments).
    """
    numels = [_numel(s) for _, s in shapes]
    n = sum(numels)
    low = 2 if bf16 else 4  # DeepSpeed keeps its model weights in the training dtype
    if strategy == "ddp":
        # fp32 parameters, autocast casts per forward; every rank holds everything
        return {"params": 4 * n, "masters": 0, "grads": 4 * n, "moments": 8 * n, "ema": 4 * n}
    if strategy == "fsdp":
        held = padded = 0
        for _, shape in shapes:
            rows, chunk = _fsdp_rows(shape, world, rank)
            row = _numel(shape[1:]) if len(shape) > 1 else 1
            held += rows * row
            padded += chunk * row
        # sharded fp32 masters are the parameters; their storage is the padded chunk
        # gradients land in the padded reduce-scatter output; moments and EMA follow the unpadded rows
        return {"params": 4 * padded, "masters": 0, "grads": 4 * padded, "moments": 8 * held, "ema": 4 * held}
    if strategy in ("zero1", "zero2"):
        # one flat buffer of all weights, aligned to 2 x world elements, split evenly
        alignment = 2 * world
        flat = -(-n // alignment) * alignment
        part = flat // world
        start, end = rank * part, (rank + 1) * part
        real = max(0, min(end, n) - start)  # the padding sits at the end of the last partition
        if strategy == "zero2":
            # reduced into one buffer holding every parameter that overlaps the partition, whole,
            # plus the alignment padding when the partition holds it
            offsets = itertools.accumulate(numels, initial=0)
            overlapping = sum(numel for numel, first in zip(numels, offsets) if first < end and first + numel > start)
            grads = low * (overlapping + part - real)
        else:
            grads = low * n  # stage 1 keeps the full gradients until the step
        return {"params": flat * low, "masters": 4 * part, "grads": grads, "moments": 8 * part, "ema": 4 * real}
    if strategy == "zero3":
        part = real = resident = 0
        for numel in numels:
            r, p = _zero3_partition(numel, world, rank)
            real, part = real + r, part + p
            if numel <= DS_PERSISTENCE_THRESHOLD and world > 1:
                resident += p * world  # small parameters stay gathered (in a padded buffer) between steps;
                # with one rank the gathered parameter is its partition
        return {"params": (part + resident) * low, "masters": 4 * part, "grads": part * low, "moments": 8 * part,
                "ema": 4 * real}
    raise ConfigError(f"distributed.strategy={strategy!r}: expected one of {STRATEGIES}")


def _block_numels(shapes) -> list[int]:
    blocks: dict[str, int] = {}
    for name, shape in shapes:
        parts = name.split(".")
        if parts[1] in ("patch_blocks", "pixel_blocks"):
            key = ".".join(parts[:3])
            blocks[key] = blocks.get(key, 0) + _numel(shape)
    return list(blocks.values()) or [0]


def transient_bytes(shapes, strategy: str, world: int, bf16: bool) -> dict[str, int]:
    """The largest buffers a strategy allocates inside a step (estimates; docs/planning.md)."""
    n = sum(_numel(s) for _, s in shapes)
    largest = max(_block_numels(shapes))
    non_block = n - sum(_block_numels(shapes))
    low = 2 if bf16 else 4
    if strategy == "ddp":
        return {"gradient buckets": 4 * n * DDP_BUCKET_FACTOR if world > 1 else 0}
    if strategy == "fsdp":
        # the root's parameters plus the current and the prefetched block, gathered in the compute dtype;
        # one block's unsharded fp32 gradients before the reduce-scatter
        return {"gathered params": low * (non_block + 2 * largest) if world > 1 else 0,
                "unsharded grads": 4 * largest if world > 1 else 0}
    if strategy in ("zero1", "zero2"):
        return {"reduce bucket": low * min(DS_REDUCE_BUCKET, n)}
    return {"gathered params": low * min(n, 2 * largest + non_block), "reduce bucket": low * min(DS_REDUCE_BUCKET, n)}


# ---------------------------------------------------------------- activations


@dataclass
class Activations:
    """Elements autograd keeps per image, by where they come from (fp32 count: 4 bytes each)."""

    base: float          # embedders, conditioning, final layer (outside the blocks)
    patch_block: float
    pit_block: float
    patch_input: float   # one patch block's input (what a checkpointed block keeps)
    pit_input: float
    projector: float
    shared_inputs: float  # block inputs every checkpointed block shares (s_cond of the PiT blocks)


def activation_terms(arch, height: int, width: int, repa: bool) -> Activations:
    """Saved-for-backward elements per image, term by term from the model's forward (docs/planning.md)."""
    p, D, C = arch.patch_size, arch.hidden_size, arch.in_channels
    L = (height // p) * (width // p)
    P = height * width
    h = arch.num_heads
    F = swiglu_hidden(D)
    # patch block: 2 x (RMSNorm input, normed, weighted, modulated: 4LD + rsqrt L + (1 + scale) D);
    # attention: qkv 3LD, q/k normed 2LD, rotated q/k 2LD, SDPA output LD + its log-sum-exp hL, the
    # heads-merged projection input LD, q/k rsqrt 2hL; the attention and MLP outputs (gated) 2LD;
    # SwiGLU w1, w3, silu and product 4LF; the AdaLN output 6D (chunks are views)
    norm_mod = 4 * L * D + L + D
    attention = 9 * L * D + 3 * h * L
    patch_block = 2 * norm_mod + attention + 2 * L * D + 4 * L * F + 6 * D
    base = 256 + 4 * D + L * C * p * p  # timestep features, embedder MLP, conditioning, unfolded patches
    if arch.variant == "dit":
        base += 3 * L * D + L  # final RMSNorm: input, normed, weighted (the head's input), rsqrt
        pit_block = pit_input = shared = 0.0
    else:
        d, p2 = arch.pixel_hidden_size, p * p
        n_chunks = 4 if arch.post_modulation else 6
        mod = L * n_chunks * d * (p2 if arch.pixel_adaln == "pixel" else 1)
        # PiT block: AdaLN output; 2 x (RMSNorm input, normed, 1 + scale, weighted, modulated: 5Pd + rsqrt P);
        # compaction output (attention input) LD + attention 9LD + 3hL + expansion input LD; gated
        # attention and MLP outputs 2Pd; the pixel MLP's hidden 4Pd before and after GELU
        pit_block = mod + 2 * (5 * P * d + P) + 11 * L * D + 3 * h * L + 2 * P * d + 8 * P * d
        # pixel embedder input PC, s_cond before and after SiLU 2LD, final RMSNorm 3Pd + P
        base += P * C + 2 * L * D + 3 * P * d + P
        pit_input, shared = P * d, L * D
    projector = 0.0
    if repa:
        # Linear, SiLU, Linear, SiLU, Linear on L tokens of width D: each SiLU keeps its input and
        # the next Linear its output
        projector = 4 * L * D
    return Activations(base=base, patch_block=patch_block, pit_block=pit_block, patch_input=L * D,
                       pit_input=pit_input, projector=projector, shared_inputs=shared)


def saved_activation_elements(terms: Activations, arch, checkpointing: str) -> float:
    """Elements kept from forward to backward per image under `train.activation_checkpointing`."""
    blocks = [terms.patch_block] * arch.patch_depth + [terms.pit_block] * (
        arch.pixel_depth if arch.variant == "pixeldit" else 0)
    inputs = [terms.patch_input] * arch.patch_depth + [terms.pit_input] * (
        arch.pixel_depth if arch.variant == "pixeldit" else 0)
    total = terms.base + terms.projector
    pit_checkpointed = False
    for i, (full, kept) in enumerate(zip(blocks, inputs)):
        # parallel/wrap.apply_activation_checkpointing's rule over patch blocks, then PiT blocks
        checkpointed = checkpointing == "every" or (checkpointing == "selective" and i % 2 == 0)
        total += kept if checkpointed else full
        pit_checkpointed |= checkpointed and i >= arch.patch_depth
    if pit_checkpointed:
        total += terms.shared_inputs  # s_cond, held by the checkpointed PiT blocks, not by any op
    return total


def recompute_elements(terms: Activations, arch, checkpointing: str) -> float:
    """Extra elements alive during backward: the one block being recomputed."""
    if checkpointing == "none":
        return 0.0
    return max(terms.patch_block, terms.pit_block)


def activation_bytes_per_image(arch, height, width, repa, checkpointing, bf16) -> dict[str, float]:
    terms = activation_terms(arch, height, width, repa)
    # bf16: matmul inputs and outputs are 2 bytes, but RMSNorm keeps fp32 statistics and inputs and
    # RoPE rotates in fp32: measured on tiny / small models with bf16 weights, 2.1-2.35 saved bytes
    # per element (tests/test_plan.py)
    per_element = BF16_BYTES_PER_SAVED_ELEMENT if bf16 else 4.0
    saved = saved_activation_elements(terms, arch, checkpointing)
    return {"saved": saved * per_element, "recompute": recompute_elements(terms, arch, checkpointing) * per_element,
            "elements": saved}


# ---------------------------------------------------------------- DINOv2 (online REPA)


DINO_SIZES = {"dinov2_vits14": (384, 12), "dinov2_vitb14": (768, 12), "dinov2_vitl14": (1024, 24),
              "dinov2_vitg14": (1536, 40)}


def dino_figures(encoder: str, image_size: int) -> dict:
    """Parameters and forward FLOPs per image of the frozen DINOv2 ViT at 14·S/16 px.

    `repa.encoder` is a hub name or a weights file; a file named otherwise is planned as ViT-B/14,
    and the plan says so (`name`)."""
    base = encoder.split("/")[-1].split(".")[0].replace("_pretrain", "")
    name = base if base in DINO_SIZES else f"dinov2_vitb14 (assumed for {encoder})"
    dim, depth = DINO_SIZES.get(base, DINO_SIZES["dinov2_vitb14"])
    grid = image_size // 16
    tokens = grid * grid + 1
    per_layer = 12 * dim * dim + 13 * dim
    params = depth * per_layer + 3 * DINO_PATCH * DINO_PATCH * dim + dim + tokens * dim + 2 * dim
    flops = depth * (2 * tokens * 12 * dim * dim + 4 * tokens * tokens * dim) + 2 * tokens * 3 * DINO_PATCH ** 2 * dim
    return {"name": name, "params": float(params), "flops": float(flops), "tokens": grid * grid, "dim": dim}


# ---------------------------------------------------------------- the plan


@dataclass
class PlanInputs:
    gpus: int
    gpu: GPUKind
    mfu: float = DEFAULT_MFU
    price_per_gpu_hour: float | None = None
    storage_gbps: float = DEFAULT_STORAGE_GBPS


def resolve_gpu(name: str | None, tflops: float | None, memory_gb: float | None,
                internode_gbps: float | None = None, gpus_per_node: int | None = None) -> GPUKind:
    if name:
        key = GPU_ALIASES.get(name.lower(), name.lower())
        if key not in GPU_KINDS:
            raise ConfigError(f"--gpu {name}: unknown GPU kind; known: {', '.join(sorted(GPU_KINDS))} "
                              f"(or give --tflops and --memory-gb)")
        kind = GPU_KINDS[key]
    elif not (tflops and memory_gb):
        raise ConfigError("no GPU kind: name one with --gpu (e.g. --gpu h200) or give both --tflops and --memory-gb")
    else:
        kind = GPUKind("custom", tflops, memory_gb, 0.0, 0.0)  # no link figures: communication is not timed
    return dataclasses.replace(kind, bf16_tflops=tflops or kind.bf16_tflops, memory_gb=memory_gb or kind.memory_gb,
                               internode_gbps=internode_gbps or kind.internode_gbps,
                               gpus_per_node=gpus_per_node or kind.gpus_per_node)


def link(gpu: GPUKind, world: int) -> tuple[str, float]:
    """(name, GB/s per GPU) of the slowest link a ring over `world` GPUs crosses: NVLink inside one
    node, the inter-node network as soon as the ranks span nodes."""
    if world > gpu.gpus_per_node:
        return "inter-node network", gpu.internode_gbps
    return "NVLink", gpu.interconnect_gbps


def manifest_image_bytes(cfg) -> tuple[float, str, int | None]:
    """(mean bytes per stored image, where that comes from, samples) from data.source's manifest,
    else the stated assumption and no sample count."""
    from ..data_pipelines.manifest import load_manifest
    from ..storage import storage_options
    from ..errors import PixelDiTError

    source = cfg.data.source
    if source and source != "synthetic":
        deadline = min(cfg.data.io_timeout_s, MANIFEST_DEADLINE_S)
        try:
            manifest = load_manifest(source, storage_options(cfg.data.endpoint_url, deadline, cfg.data.retries))
        except (PixelDiTError, OSError) as e:  # no manifest reachable from here: the plan says what it assumed
            reason = f"no manifest read within {deadline:g} s: {type(e).__name__}"
        else:
            count = sum(s.samples for s in manifest.shards)
            if count:
                return sum(s.bytes for s in manifest.shards) / count, f"manifest at {source} ({count} samples)", count
            reason = "the manifest lists no samples"
    else:
        reason = "synthetic data"
    scaled = ASSUMED_JPEG_BYTES_256 * (cfg.data.image_size / 256) ** 2
    return scaled, f"assumed {scaled / 1e3:.0f} kB per JPEG ({reason})", None


def loader_memory(cfg, per_rank: int, decoded_per_image: float, stored_per_image: float) -> dict:
    """Where a rank's loader keeps its whole per-rank batches, and how many of them.

    pil: decoded uint8 batches in host memory (pinned on CUDA hosts), as many as the loader's
    buffer pool keeps: every decode thread's batch plus the prefetched ones, and the ones the
    step still holds; the step's batch is then copied to the GPU. dali: the encoded batches
    queued for DALI in host memory; DALI decodes on the GPU into its prefetch queue, next to
    the batch in use."""
    from ..data_pipelines.loader import THREADS_PER_PROCESS, batches_in_flight

    if cfg.data.decoder == "dali":
        host_batches, host_per_image = LOADER_PREFETCH + 2, stored_per_image
        device_batches = LOADER_PREFETCH + 1
    else:
        host_batches = batches_in_flight(THREADS_PER_PROCESS * cfg.data.num_workers, LOADER_PREFETCH) + 4
        host_per_image, device_batches = decoded_per_image, 1
    return {"decoder": cfg.data.decoder, "host_batches": host_batches,
            "host_bytes": host_batches * per_rank * host_per_image,
            "device_batches": device_batches, "device_bytes": device_batches * per_rank * decoded_per_image}


@dataclass
class _Run:
    """The figures every strategy's plan shares."""
    cfg: object
    inputs: PlanInputs
    arch: object
    size: int
    bf16: bool
    shapes: list
    n_params: int
    flops_image: float
    layout: object
    link_name: str
    link_gbps: float
    dino: dict
    encoder_bytes: float
    features_bytes: float
    image_bytes: float
    image_bytes_source: str
    samples: int | None
    loader: dict
    step_flops: float
    step_flops_dino: float
    compute_s: float


def _run_figures(cfg, inputs: PlanInputs) -> _Run:
    arch = cfg.model.arch()
    size = cfg.data.image_size
    repa = cfg.repa.kind()
    shapes = parameter_shapes(cfg)
    flops_image = training_flops(arch, size, size)
    world = inputs.gpus
    layout = cfg.train.layout(world)  # the trainer's own split, and its refusal
    link_name, link_gbps = link(inputs.gpu, world)
    dino = dino_figures(cfg.repa.encoder, size)
    # the encoder runs in bf16 on GPUs without gradients: its weights stay, its activations do not
    encoder_bytes = 2 * dino["params"] if repa.encodes_online else 0.0
    decoded_per_image = 3 * size * size  # decoded uint8 RGB
    features_bytes = REPA_CACHE_BYTES_PER_VALUE * (size // arch.patch_size) ** 2 * cfg.repa.encoder_dim
    image_bytes, image_bytes_source, samples = manifest_image_bytes(cfg)
    stored_per_image = image_bytes
    if repa.reads_features:
        # the targets travel with the images, in the cache's 16 bits
        decoded_per_image += features_bytes
        stored_per_image += features_bytes
    step_flops = flops_image * cfg.train.global_batch
    step_flops_dino = dino["flops"] * cfg.train.global_batch if repa.encodes_online else 0.0
    return _Run(cfg=cfg, inputs=inputs, arch=arch, size=size, bf16=cfg.distributed.precision == "bf16",
                shapes=shapes, n_params=sum(_numel(s) for _, s in shapes), flops_image=flops_image, layout=layout,
                link_name=link_name, link_gbps=link_gbps, dino=dino, encoder_bytes=encoder_bytes,
                features_bytes=features_bytes, image_bytes=image_bytes, image_bytes_source=image_bytes_source,
                samples=samples, loader=loader_memory(cfg, layout.per_rank, decoded_per_image, stored_per_image),
                step_flops=step_flops, step_flops_dino=step_flops_dino,
                compute_s=(step_flops + step_flops_dino) / (world * inputs.gpu.bf16_tflops * 1e12 * inputs.mfu))


def _micro_batch_fits(run: _Run, fixed: float) -> dict:
    """Per activation-checkpointing mode: the largest micro batch that fits beside `fixed` bytes."""
    cfg, layout = run.cfg, run.layout
    usable = run.inputs.gpu.memory_gb * GB * USABLE_MEMORY_FRACTION
    modes = {}
    for mode in ("none", "every"):
        act = activation_bytes_per_image(run.arch, run.size, run.size, cfg.repa.kind().has_loss, mode, run.bf16)
        # the recomputed block lives at the micro batch's size too
        per_image = act["saved"] + act["recompute"]
        room = usable - fixed
        fits = max(0, int(room // per_image)) if room > 0 else 0
        # the configured micro-batch when it fits, else the layout train.micro_batch=<what fits> gives
        runs = layout if fits >= layout.micro_batch else (
            batch_layout(cfg.train.global_batch, fits, run.inputs.gpus) if fits else None)
        modes[mode] = {"activation_bytes_per_image": act["saved"], "recompute_bytes_per_image": act["recompute"],
                       "max_micro_batch_memory": fits, "configured_fits": fits >= layout.micro_batch,
                       "micro_batch": runs.micro_batch if runs else 0,
                       "accumulation": runs.accumulation if runs else None}
    return modes


def _strategy_plan(run: _Run, name: str) -> dict:
    world = run.inputs.gpus
    # the fullest rank: padding and the parameters that straddle partitions differ between ranks
    state = max((state_bytes(run.shapes, name, world, rank, run.bf16) for rank in range(world)),
                key=lambda counts: sum(counts.values()))
    transient = transient_bytes(run.shapes, name, world, run.bf16)
    if name == "ddp" and run.bf16:
        transient["autocast weight copies"] = 2 * run.n_params  # bf16 casts kept for backward
    fixed = sum(state.values()) + sum(transient.values()) + run.encoder_bytes + run.loader["device_bytes"]
    modes = _micro_batch_fits(run, fixed)
    checkpoint_bytes = _checkpoint_bytes(run.n_params, name, run.bf16)
    accumulation = modes["none"]["accumulation"] or modes["every"]["accumulation"] or run.layout.accumulation
    traffic = comm_bytes_per_step(run.n_params, name, world, accumulation, run.bf16)
    comm_s = traffic / (run.link_gbps * GB) if run.link_gbps else (0.0 if not traffic else None)
    # collectives assumed to overlap compute fully (FSDP2 and ZeRO prefetch, DDP's buckets run during
    # backward): only communication beyond the compute lengthens the step
    step_s = max(run.compute_s, comm_s or 0.0)
    return {"comm_bytes_per_step": traffic, "comm_s_per_step": comm_s,
            "comm_vs_compute": comm_s / run.compute_s if comm_s is not None else None,
            "comm_bound": comm_s is not None and comm_s > run.compute_s, "step_s": step_s,
            "checkpoint_bytes": checkpoint_bytes,
            "checkpoint_save_s": checkpoint_bytes / (run.inputs.storage_gbps * GB),
            "state": state, "transient": transient, "encoder_bytes": run.encoder_bytes,
            "loader_device_bytes": run.loader["device_bytes"],
            "fixed_bytes": fixed, "activation_checkpointing": modes}


def _repa_plan(run: _Run, img_s: float) -> dict:
    cfg, dino, gpu, mfu = run.cfg, run.dino, run.inputs.gpu, run.inputs.mfu
    encoder_s_per_image = dino["flops"] / (gpu.bf16_tflops * 1e12 * mfu)
    return {
        "mode": cfg.repa.mode, "encoder": dino["name"],
        "cache_bytes_per_image": run.features_bytes,
        # the whole cache: one entry per sample of data.source (known from its manifest only)
        "cache_bytes": run.features_bytes * run.samples if run.samples else None,
        "cache_bandwidth_bytes_s": run.features_bytes * img_s,
        "online_encoder_flops_per_image": dino["flops"],
        "online_encoder_gpu_fraction": dino["flops"] / (run.flops_image + dino["flops"]),
        "online_encoder_gpu_hours": encoder_s_per_image * cfg.train.global_batch * cfg.train.steps / 3600,
    }


def make_plan(cfg, inputs: PlanInputs, strategies=STRATEGIES) -> dict:
    run = _run_figures(cfg, inputs)
    gpu, world, layout = inputs.gpu, inputs.gpus, run.layout
    per_strategy = {name: _strategy_plan(run, name) for name in strategies}
    timed = cfg.distributed.strategy if cfg.distributed.strategy in per_strategy else None
    step_s = per_strategy[timed]["step_s"] if timed else run.compute_s
    img_s = cfg.train.global_batch / step_s
    total_s = step_s * cfg.train.steps
    gpu_hours = total_s * world / 3600
    return {
        "config": {"model": cfg.model.name, "image_size": run.size, "precision": cfg.distributed.precision,
                   "global_batch": cfg.train.global_batch, "steps": cfg.train.steps,
                   "configured_strategy": cfg.distributed.strategy, "configured_micro_batch": cfg.train.micro_batch,
                   "repa": cfg.repa.mode, "parameters": run.n_params},
        "gpu": dataclasses.asdict(gpu), "gpus": world,
        "layout": {**dataclasses.asdict(layout), "global_batch": layout.global_batch, "describe": layout.describe()},
        "link": {"name": run.link_name, "gbps": run.link_gbps, "nodes": -(-world // gpu.gpus_per_node)},
        "assumptions": {"mfu": inputs.mfu, "usable_memory_fraction": USABLE_MEMORY_FRACTION,
                        "storage_gbps": inputs.storage_gbps, "bytes_per_image_source": run.image_bytes_source,
                        "comm_overlap": "full: step = max(compute, communication)",
                        "loader_prefetch": LOADER_PREFETCH,
                        "price_per_gpu_hour": inputs.price_per_gpu_hour},
        "flops": {"training_per_image": run.flops_image,
                  "forward_per_image": forward_flops(run.arch, run.size, run.size)["total"],
                  "per_step": run.step_flops + run.step_flops_dino},
        "time": {"strategy": timed, "compute_s": run.compute_s, "step_s": step_s, "images_per_s": img_s,
                 "total_s": total_s, "total_days": total_s / 86400, "gpu_hours": gpu_hours,
                 "cost": gpu_hours * inputs.price_per_gpu_hour if inputs.price_per_gpu_hour is not None else None},
        "checkpoint": {"every_steps": cfg.checkpoint.every_steps,
                       "saves": cfg.train.steps // cfg.checkpoint.every_steps if cfg.checkpoint.every_steps else 0},
        "data": {"bytes_per_image": run.image_bytes, "bandwidth_bytes_s": run.image_bytes * img_s,
                 "images_per_s_per_gpu": img_s / world},
        "loader": run.loader,
        "repa": _repa_plan(run, img_s),
        "strategies": per_strategy,
    }


def comm_bytes_per_step(n_params: int, strategy: str, world: int, accumulation: int, bf16: bool) -> float:
    """Bytes one rank sends per optimizer step (ring collectives move (w - 1) / w of the buffer).

    ddp: one fp32 all-reduce (2x) at the last micro-batch; fsdp: all-gather of the compute weights
    in forward and again in backward for every micro-batch, one fp32 reduce-scatter per step;
    zero1/2: reduce-scatter of the gradients and all-gather of the updated weights; zero3: weights
    gathered in forward and backward of every micro-batch and gradients reduce-scattered each one.
    """
    if world == 1:
        return 0.0
    ring = (world - 1) / world
    low = 2 if bf16 else 4
    if strategy == "ddp":
        return 2 * 4 * n_params * ring
    if strategy == "fsdp":
        return (2 * low * accumulation + 4) * n_params * ring
    if strategy in ("zero1", "zero2"):
        return 2 * low * n_params * ring
    return 3 * low * accumulation * n_params * ring


def _checkpoint_bytes(n_params: int, strategy: str, bf16: bool) -> int:
    """One checkpoint: the engine's fp32 weights and two AdamW moments (DeepSpeed adds its model
    weights in the training dtype) and the fp32 EMA; rank files and meta are kilobytes."""
    model_copy = (2 if bf16 else 4) if strategy.startswith("zero") else 0
    return n_params * (4 + 8 + model_copy + 4)


# ---------------------------------------------------------------- text


def _gb(x: float) -> str:
    return f"{x / GB:7.2f}"


def _gbps(x: float) -> str:
    return f"{x:.0f} GB/s" if x else "? GB/s"


def format_plan(plan: dict) -> str:
    return "\n".join(_header_lines(plan) + _table_lines(plan) + _summary_lines(plan))


def _header_lines(plan: dict) -> list[str]:
    c, g, a, k = plan["config"], plan["gpu"], plan["assumptions"], plan["link"]
    return [
        f"plan      {c['model']} ({c['parameters'] / 1e6:.2f}M trained parameters) at {c['image_size']}px, "
        f"{c['precision']}, global batch {c['global_batch']}, {c['steps']} steps, REPA {c['repa']}",
        f"hardware  {plan['gpus']} x {g['name']}: {g['bf16_tflops']:.0f} TFLOP/s bf16 dense, {g['memory_gb']:.0f} GB "
        f"({a['usable_memory_fraction']:.0%} usable); {k['nodes']} node{'s' if k['nodes'] > 1 else ''} of "
        f"{g['gpus_per_node']}: NVLink {_gbps(g['interconnect_gbps'])}, network {_gbps(g['internode_gbps'])} "
        f"per GPU; rings run over {k['name']}",
        f"batch     {plan['layout']['describe']} (train.micro_batch={c['configured_micro_batch']})",
        f"assumed   MFU {a['mfu']:.0%}; communication overlaps compute (step = the longer of the two); "
        f"storage {a['storage_gbps']:.2f} GB/s",
        "",
        f"{'memory per rank (GB)':<28}" + "".join(f"{s:>9}" for s in plan["strategies"]),
    ]


def _table_lines(plan: dict) -> list[str]:
    """Per strategy, one column: memory, the largest micro batch, communication."""
    g, k, lo = plan["gpu"], plan["link"], plan["loader"]
    per_node = min(plan["gpus"], g["gpus_per_node"])
    strategies = plan["strategies"]
    lines = []

    def row(label, fn):
        lines.append(f"{label:<28}" + "".join(f"{fn(v):>9}" for v in strategies.values()))

    for key, label in (("params", "parameters"), ("masters", "fp32 master partition"), ("grads", "gradients"),
                       ("moments", "AdamW moments"), ("ema", "EMA fragments (fp32)")):
        row(f"  {label}", lambda v, k=key: _gb(v["state"][k]).strip())
    row("  transient buffers", lambda v: _gb(sum(v["transient"].values())).strip())
    row("  DINOv2 encoder", lambda v: _gb(v["encoder_bytes"]).strip())
    row(f"  loader batches ({lo['device_batches']})", lambda v: _gb(v["loader_device_bytes"]).strip())
    row("  fixed total", lambda v: _gb(v["fixed_bytes"]).strip())
    for mode, label in (("none", "no activation checkpointing"), ("every", "checkpointing every block")):
        lines.append(f"{label}")
        row("  activations / image", lambda v, m=mode: _gb(v["activation_checkpointing"][m]
                                                            ["activation_bytes_per_image"]).strip())
        row("  largest micro batch", lambda v, m=mode: str(v["activation_checkpointing"][m]["max_micro_batch_memory"]))
        row("  micro x accumulation", lambda v, m=mode: (
            f"{v['activation_checkpointing'][m]['micro_batch']}x{v['activation_checkpointing'][m]['accumulation']}"
            if v["activation_checkpointing"][m]["micro_batch"] else "no fit"))
    lines.append(f"communication per step (rank), over {k['name']} at {_gbps(k['gbps'])}")
    row("  GB sent", lambda v: _gb(v["comm_bytes_per_step"]).strip())
    row("  ms", lambda v: f"{1e3 * v['comm_s_per_step']:.0f}" if v["comm_s_per_step"] is not None else "-")
    row("  vs compute", lambda v: f"{v['comm_vs_compute']:.0%}" if v["comm_vs_compute"] is not None else "-")
    row("  step (s)", lambda v: f"{v['step_s']:.3f}")
    lines.append(f"host memory per rank: loader {lo['host_batches']} {lo['decoder']} batches of "
                 f"{plan['layout']['per_rank']} {'encoded' if lo['decoder'] == 'dali' else 'decoded'} images = {lo['host_bytes'] / GB:.2f} GB "
                 f"({per_node * lo['host_bytes'] / GB:.1f} GB per node of {per_node})")
    return lines


def _summary_lines(plan: dict) -> list[str]:
    """Time, cost, checkpoints, data and REPA rates under the configured strategy."""
    c, a, t, k = plan["config"], plan["assumptions"], plan["time"], plan["link"]
    f, ck, d, r = plan["flops"], plan["checkpoint"], plan["data"], plan["repa"]
    strategies = plan["strategies"]
    lines = []
    own = strategies.get(c["configured_strategy"]) or next(iter(strategies.values()))
    cost = f", ${t['cost']:,.0f} at ${a['price_per_gpu_hour']}/GPU-h" if t["cost"] is not None else \
        " (give --price-per-gpu-hour for the cost)"
    bound = [f"{name} {1e3 * v['comm_s_per_step']:.0f} ms" for name, v in strategies.items() if v["comm_bound"]]
    if bound:
        lines.append(f"warning   communication exceeds the {1e3 * t['compute_s']:.0f} ms of compute per step over "
                     f"{k['name']} ({', '.join(bound)}): those steps wait on communication")
    speed = f"{t['strategy']}: " if t["strategy"] else ""
    return lines + [
        "",
        f"compute   {f['training_per_image'] / 1e9:.1f} GFLOPs/image for training (3x forward, as `pixeldit info`)",
        f"speed     {speed}{t['step_s']:.3f} s/step (compute {t['compute_s']:.3f} s), {t['images_per_s']:.0f} img/s "
        f"at MFU {a['mfu']:.0%}",
        f"run       {t['total_days']:.1f} days, {t['gpu_hours']:,.0f} GPU-hours{cost}",
        f"ckpt      {c['configured_strategy']}: {own['checkpoint_bytes'] / GB:.1f} GB each (engine + EMA), "
        f"{own['checkpoint_save_s']:.0f} s at {a['storage_gbps']} GB/s; {ck['saves']} saves every {ck['every_steps']} "
        f"steps ({ck['saves'] * own['checkpoint_save_s'] / 3600:.1f} h of saving if the step waits for it)",
        f"data      {d['bandwidth_bytes_s'] / 1e6:.0f} MB/s to sustain ({d['bytes_per_image'] / 1e3:.0f} kB/image: "
        f"{a['bytes_per_image_source']}), {d['images_per_s_per_gpu']:.0f} img/s per GPU to decode",
        f"REPA      cache {r['cache_bytes_per_image'] / 1e3:.0f} kB/image ("
        + (f"{r['cache_bytes'] / GB:.1f} GB for the data set" if r["cache_bytes"] else
           f"{r['cache_bytes_per_image'] * IMAGENET_TRAIN_IMAGES / GB:.0f} GB if the data set is ImageNet-1k's "
           f"{IMAGENET_TRAIN_IMAGES:,} images")
        + f"), read at {r['cache_bandwidth_bytes_s'] / 1e6:.0f} MB/s; "
        f"online {r['encoder']} would cost {r['online_encoder_gpu_fraction']:.1%} of the GPU time "
        f"({r['online_encoder_gpu_hours']:,.0f} GPU-hours); configured: {r['mode']}",
    ]
