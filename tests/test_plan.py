"""`pixeldit plan` checked against measurement: state bytes counted on live strategy objects after
one step (2 real gloo processes, every strategy in sequence in one process group), activations
counted with saved-tensor hooks, FLOPs against `pixeldit info`."""

import json
import os

import pytest
import torch

from tests.dist import run_distributed
from tests.s3_server import without_aws_environment

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


def _grads(strategy, name) -> int:
    if name.startswith("zero"):
        # the reduced gradients of this rank's partition (views of DeepSpeed's partition buffer)
        return _storages(g for grads in strategy.engine.optimizer.averaged_gradients.values() for g in grads)
    return _storages(_local(p.grad) for p in strategy.module.parameters())


def _measure_one(name: str, world: int) -> dict:
    from pixeldit.models import build_model, build_projector
    from pixeldit.platform.config import load_config
    from pixeldit.parallel.ema import ShardedEMA
    from pixeldit.parallel import TrainModule, build_strategy

    cfg = load_config(None, _overrides(name, world))
    torch.manual_seed(0)
    arch = cfg.model.arch()
    module = TrainModule(build_model(cfg.model.name, **cfg.model.overrides()),
                         build_projector(arch.hidden_size, cfg.repa.encoder_dim), cfg.repa.block)
    strategy = build_strategy(module, cfg.parallel_spec(world), torch.device("cpu"))
    ema = ShardedEMA(strategy.checkpoint.fragments(), 0.999, replicated=name == "ddp")
    strategy.begin_step(1e-3, 1.0)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randint(0, 10, (2,))
    with strategy.accumulating(True):
        v, h = strategy.forward(x, t, y)
        loss = v.float().pow(2).mean() + h.float().pow(2).mean()
        if name.startswith("zero"):
            # ZeroStrategy.backward's two calls, with the count between them: DeepSpeed frees the
            # gradient partition in its step
            strategy.engine.backward(loss)
            grads = _grads(strategy, name)
            strategy.engine.step()
        else:
            strategy.backward(loss)
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
    from pixeldit.jobs.plan import parameter_shapes, state_bytes

    for name in STRATEGIES:
        shapes = parameter_shapes(load_config(None, _overrides(name, world)))
        for rank in range(world):
            planned = state_bytes(shapes, name, world, rank, bf16=True)
            counted = measured[world][rank][name]
            for key, value in counted.items():
                assert planned[key] == value, (name, world, rank, key, planned[key], value)


def _keep_each(keep, args):
    for a in args:
        keep(a)  # returns None: a forward pre-hook that returned something would replace the inputs


def _saved_bytes(model_name: str, size: int, checkpointing: str, dtype=torch.float32, **arch) -> tuple[int, int]:
    """(bytes autograd saves for backward in one forward of TrainModule with REPA, batch) -- unique storages,
    parameters excluded; under activation checkpointing also the inputs each checkpointed block keeps."""
    from pixeldit.models import build_model, build_projector
    from pixeldit.parallel import TrainModule
    from pixeldit.parallel.wrap import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(model_name, **arch)
    module = TrainModule(model, build_projector(model.arch.hidden_size, 32), 2).to(dtype)
    apply_activation_checkpointing(model, checkpointing)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        keep(tensor)
        return tensor

    blocks = [*model.patch_blocks, *model.pixel_blocks]
    for i, block in enumerate(blocks):
        if checkpointing == "every" or (checkpointing == "selective" and i % 2 == 0):
            # non-reentrant checkpointing holds the block's inputs itself, outside any saved-tensor hook
            block.register_forward_pre_hook(lambda _, args: _keep_each(keep, args[:2]))
    batch = 2
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, torch.rand(batch), torch.randint(0, model.num_classes, (batch,)))
    return sum(seen.values()), batch


# XL's widths at 256 px with 2 patch blocks and 1 PiT block: every per-block term XL has, in seconds
XL_GEOMETRY = ("pixeldit-xl", 256, {"patch_depth": 2, "pixel_depth": 1})


@pytest.mark.parametrize("model_name,size,arch", [("pixeldit-tiny", 16, {"patch_size": 4}),
                                                  ("pixeldit-small", 32, {"patch_depth": 3}), XL_GEOMETRY])
@pytest.mark.parametrize("checkpointing", ["none", "every", "selective"])
def test_planned_activations_are_within_15_percent_of_the_saved_tensors(model_name, size, arch, checkpointing):
    from pixeldit.models import resolve_arch
    from pixeldit.jobs.plan import activation_bytes_per_image

    model_arch = resolve_arch(model_name, **arch)
    measured, batch = _saved_bytes(model_name, size, checkpointing, **arch)
    planned = activation_bytes_per_image(model_arch, size, size, True, checkpointing, bf16=False)["saved"]
    assert abs(planned * batch / measured - 1) < 0.15, (planned * batch, measured)


@pytest.mark.parametrize("model_name,size,arch", [("pixeldit-small", 64, {"patch_depth": 2, "patch_size": 16}),
                                                  XL_GEOMETRY])
@pytest.mark.parametrize("checkpointing", ["none", "every"])
def test_planned_bf16_activations_are_within_15_percent_with_bf16_weights(model_name, size, arch, checkpointing):
    # bf16 weights, as fsdp and ZeRO compute (ddp's autocast adds weight copies, planned separately)
    from pixeldit.models import resolve_arch
    from pixeldit.jobs.plan import activation_bytes_per_image

    measured, batch = _saved_bytes(model_name, size, checkpointing, torch.bfloat16, **arch)
    planned = activation_bytes_per_image(resolve_arch(model_name, **arch), size, size, True, checkpointing,
                                         bf16=True)["saved"]
    assert abs(planned * batch / measured - 1) < 0.15, (planned * batch, measured)


XL = os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet256", "pixeldit_xl.yaml")


@pytest.fixture(autouse=True)
def no_aws_credentials(monkeypatch):
    """The XL config's shards are in a bucket no test can reach. With no credentials the plan gives up
    on its manifest at once, as it does on a user's machine without them. The S3 tests leave fake
    credentials in the session's environment: with those the plan retried the unreachable endpoint
    until its deadline, 7 s a plan and 80 s of the suite, whichever test ran first."""
    without_aws_environment(monkeypatch)


def _plan_json(capsys, *args) -> dict:
    from pixeldit.cli import main

    assert main(["plan", "--config", XL, *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_reads_the_manifest_and_agrees_with_pixeldit_info(synthetic_shards, capsys):
    from pixeldit.cli import main
    from pixeldit.data_pipelines.manifest import load_manifest

    plan = _plan_json(capsys, "--set", f"data.source={synthetic_shards}", "--gpus", "8", "--gpu", "h200",
                      "--price-per-gpu-hour", "2.5", "--mfu", "0.5")
    assert main(["info", "pixeldit-xl"]) == 0
    info = capsys.readouterr().out
    training_line = next(line for line in info.splitlines() if line.startswith("training"))
    assert f"{plan['flops']['training_per_image'] / 1e9:.1f} GFLOPs/image" in training_line

    shards = load_manifest(synthetic_shards).shards
    assert plan["data"]["bytes_per_image"] == sum(s.bytes for s in shards) / sum(s.samples for s in shards)
    assert synthetic_shards in plan["assumptions"]["bytes_per_image_source"]
    assert plan["repa"]["cache_bytes"] == plan["repa"]["cache_bytes_per_image"] * sum(s.samples for s in shards)
    t = plan["time"]
    # the step's FLOPs at the stated MFU on 8 GPUs, and the cost from the GPU-hours
    assert t["images_per_s"] * plan["flops"]["training_per_image"] == pytest.approx(8 * 989e12 * 0.5)
    assert t["gpu_hours"] == pytest.approx(8 * t["step_s"] * 1601280 / 3600)
    assert t["cost"] == pytest.approx(2.5 * t["gpu_hours"])
    # the paper's layout: 8 H200s hold a micro batch of 32 without checkpointing under every sharded strategy
    for name in ("fsdp", "zero2", "zero3"):
        fits = plan["strategies"][name]["activation_checkpointing"]["none"]
        assert (fits["micro_batch"], fits["accumulation"]) == (32, 1), name
    # sharding shrinks the per-rank state in the order the strategies promise
    total = {n: sum(s["state"].values()) for n, s in plan["strategies"].items()}
    assert total["ddp"] > total["zero1"] > total["zero2"] > total["zero3"]


def test_plan_text_and_a_gpu_it_does_not_know(synthetic_shards, capsys):
    from pixeldit.cli import main

    assert main(["plan", "--config", XL, "--set", f"data.source={synthetic_shards}", "--gpus", "16",
                 "--tflops", "500", "--memory-gb", "48"]) == 0
    text = capsys.readouterr().out
    assert "16 x custom: 500 TFLOP/s" in text and "MFU 40%" in text and "zero3" in text
    assert main(["plan", "--config", XL, "--gpus", "8", "--gpu", "h300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixeldit plan: error: --gpu h300: unknown GPU kind") and "\n" not in err


def test_plan_times_communication_over_the_network_past_one_node(capsys):
    from pixeldit.cli import main

    def comm(plan, name="fsdp"):
        return plan["strategies"][name]

    # inside one node the rings run over NVLink, compute-bound; across 8 nodes over 50 GB/s per GPU
    one_node = _plan_json(capsys, "--gpus", "8", "--gpu", "h200")
    assert one_node["link"]["name"] == "NVLink"
    assert comm(one_node)["comm_s_per_step"] == pytest.approx(comm(one_node)["comm_bytes_per_step"] / 900e9)
    assert not comm(one_node)["comm_bound"] and one_node["time"]["step_s"] == one_node["time"]["compute_s"]
    nodes = _plan_json(capsys, "--gpus", "64", "--gpu", "h200")
    assert nodes["link"] == {"name": "inter-node network", "gbps": 50.0, "nodes": 8}
    fsdp = comm(nodes)
    assert fsdp["comm_s_per_step"] == pytest.approx(fsdp["comm_bytes_per_step"] / 50e9)
    # full overlap: the step is the longer of compute and communication, and the configured strategy times the run
    assert fsdp["comm_bound"] and nodes["time"]["step_s"] == fsdp["step_s"] == fsdp["comm_s_per_step"]
    assert nodes["time"]["gpu_hours"] > 1.5 * one_node["time"]["gpu_hours"]
    # the network figure and the node size are overridable: 64 GPUs in one NVLink domain are compute-bound again
    assert _plan_json(capsys, "--gpus", "64", "--gpu", "h200", "--internode-gbps", "100")["link"]["gbps"] == 100
    flat = _plan_json(capsys, "--gpus", "64", "--gpu", "h200", "--gpus-per-node", "64")
    assert flat["link"]["name"] == "NVLink" and not comm(flat)["comm_bound"]
    assert flat["time"]["gpu_hours"] == pytest.approx(one_node["time"]["gpu_hours"])

    assert main(["plan", "--config", XL, "--gpus", "64", "--gpu", "h200"]) == 0
    text = capsys.readouterr().out
    warning = next(line for line in text.splitlines() if line.startswith("warning"))
    assert "communication exceeds" in warning and f"fsdp {1e3 * fsdp['comm_s_per_step']:.0f} ms" in warning
    assert "rings run over inter-node network" in text
    assert main(["plan", "--config", XL, "--gpus", "8", "--gpu", "h200"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_plan_takes_the_batch_layout_from_the_config_and_its_refusal(capsys):
    from pixeldit.cli import main
    from pixeldit.errors import LaunchError
    from pixeldit.platform.batch_layout import batch_layout

    plan = _plan_json(capsys, "--set", "train.micro_batch=8", "--gpus", "8", "--gpu", "h200")
    assert (plan["layout"]["per_rank"], plan["layout"]["micro_batch"], plan["layout"]["accumulation"]) == (32, 8, 4)
    # memory allows more, but the run takes the configured micro-batch: the plan shows what will run
    fits = plan["strategies"]["fsdp"]["activation_checkpointing"]["none"]
    assert fits["max_micro_batch_memory"] > 32 and (fits["micro_batch"], fits["accumulation"]) == (8, 4)
    assert plan["strategies"]["fsdp"]["comm_bytes_per_step"] > _plan_json(
        capsys, "--gpus", "8", "--gpu", "h200")["strategies"]["fsdp"]["comm_bytes_per_step"]
    # a micro-batch that does not fit: the layout train.micro_batch=<what fits> gives
    small = _plan_json(capsys, "--gpus", "8", "--gpu", "h200", "--memory-gb", "40")
    ddp = small["strategies"]["ddp"]["activation_checkpointing"]["none"]
    assert not ddp["configured_fits"] and 0 < ddp["micro_batch"] <= ddp["max_micro_batch_memory"] < 32
    assert ddp["micro_batch"] * ddp["accumulation"] == 32

    assert main(["plan", "--config", XL, "--gpus", "24", "--gpu", "h200"]) == 2
    err = capsys.readouterr().err.strip()
    with pytest.raises(LaunchError) as refusal:
        batch_layout(256, 32, 24)
    assert err == f"pixeldit plan: error: {refusal.value}"


def test_plan_counts_loader_batches_in_host_memory(capsys):
    import inspect

    from pixeldit.data_pipelines.loader import ShardLoader
    from pixeldit.jobs import plan as plan_module

    assert plan_module.LOADER_PREFETCH == inspect.signature(ShardLoader).parameters["prefetch"].default
    pil = ["--set", "data.decoder=pil", "--set", "repa.mode=off", "--gpus", "8", "--gpu", "h200"]
    few = _plan_json(capsys, *pil, "--set", "data.num_workers=1")
    many = _plan_json(capsys, *pil, "--set", "data.num_workers=8")
    double = _plan_json(capsys, *pil, "--set", "data.num_workers=8", "--set", "train.global_batch=512")
    # whole per-rank batches of decoded pixels, more with more decode threads, twice as many bytes at twice the batch
    assert many["loader"]["host_bytes"] > few["loader"]["host_bytes"] > 0
    assert many["loader"]["host_bytes"] == many["loader"]["host_batches"] * 32 * 3 * 256 * 256
    assert double["loader"]["host_bytes"] == 2 * many["loader"]["host_bytes"]
    # host buffers take nothing from the GPU: the micro batch that fits does not move with the workers
    for name in many["strategies"]:
        assert (many["strategies"][name]["activation_checkpointing"]["none"]["max_micro_batch_memory"]
                == few["strategies"][name]["activation_checkpointing"]["none"]["max_micro_batch_memory"])
        assert many["strategies"][name]["loader_device_bytes"] == 32 * 3 * 256 * 256  # the step's batch


def test_plan_gives_up_on_an_unreachable_manifest_quickly_and_says_so(capsys, monkeypatch):
    import socket
    import time

    from pixeldit.cli import main
    from pixeldit.jobs import plan as plan_module

    # a storage endpoint that accepts connections and never answers, and a config that would wait 120 s for it
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    credentials = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(plan_module, "MANIFEST_DEADLINE_S", 1.0)
    started = time.monotonic()
    try:
        assert main(["plan", "--config", XL, "--set", "data.source=s3://silent-bucket/shards", "--set",
                     f"data.endpoint_url={endpoint}", "--set", "data.io_timeout_s=120", "--gpus", "8",
                     "--gpu", "h200"]) == 0
    finally:
        silent.close()
    assert time.monotonic() - started < 20
    data = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data"))
    assert "assumed 110 kB per JPEG (no manifest read within 1 s: StorageTimeout)" in data


def test_gpu_check_plans_each_train_variant_at_the_planners_largest_micro_batch():
    """bench/gpu_check.py runs only on a lent GPU: its planning runs anywhere, against this tree's planner."""
    import subprocess
    import sys

    from pixeldit.jobs.plan import PlanInputs, make_plan, resolve_gpu
    from pixeldit.platform.config import load_config

    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.py")
    out = subprocess.run([sys.executable, script, "--plan-only", "--memory-gb", "80", "--tflops", "400"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert {(r["strategy"], r["activation_checkpointing"], r["compile"]) for r in rows} == {
        (s, ac, c) for s in ("fsdp", "zero2") for ac in ("none", "every") for c in (False, True)}
    for strategy in ("fsdp", "zero2"):
        cfg = load_config(None, ["model.name=pixeldit-xl", "data.image_size=256", "model.num_classes=10",
                                 "distributed.precision=bf16", f"distributed.strategy={strategy}"])
        plan = make_plan(cfg, PlanInputs(1, resolve_gpu(None, 400, 80)), strategies=(strategy,))
        for mode, fits in plan["strategies"][strategy]["activation_checkpointing"].items():
            for row in rows:
                if (row["strategy"], row["activation_checkpointing"]) == (strategy, mode):
                    assert row["micro_batch"] == row["planned_max_micro_batch"] == fits["max_micro_batch_memory"] > 0
                    assert row["planned_memory_gb"] <= 80
