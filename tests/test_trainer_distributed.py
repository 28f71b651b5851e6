"""Strategy parity, exact resume and EMA resharding, on two real gloo processes.

All checks share one spawned process group: DeepSpeed's start-up is the
expensive part, so each strategy is initialised once per phase.
"""

import os

import pytest
import torch

from tests.dist import run_distributed

STEPS = 6


def _overrides(data, strategy, steps, precision="fp32"):
    return [f"data.source={data}", "data.image_size=16", "model.patch_size=4", f"distributed.strategy={strategy}",
            f"distributed.precision={precision}", "train.global_batch=8", "train.micro_batch=2",
            f"train.steps={steps}", "logging.tensorboard=false", f"checkpoint.every_steps={steps // 2}",
            "checkpoint.keep_last=5", "ema.warmup=true", "schedule.stages[0].lr=1e-3"]


def _run(rank, world, data, root, plan):
    import torch.distributed as dist

    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    results = {}
    held = _watch_the_masters()
    for name, strategy, precision, resume in plan:
        held.clear()
        cfg = load_config(None, _overrides(data, strategy, STEPS, precision))
        trainer = Trainer(cfg, os.path.join(root, name))
        resume_from = os.path.join(root, resume, "checkpoints", f"step_{STEPS // 2:08d}") if resume else None
        state = trainer.fit(resume_from)
        weights = trainer.strategy.checkpoint.full_state_dict()
        frags = [(f.name, f.start, shadow.clone()) for f, shadow in zip(trainer.ema.fragments, trainer.ema.shadow)]
        moments = _zero_moments(trainer) if strategy.startswith("zero") else None  # collective under zero3
        results[name] = {"losses": list(state.history), "weights": weights if rank == 0 else None, "ema": frags,
                         "ema_bytes": trainer.ema.local_bytes(), "moments": moments if rank == 0 else None,
                         "masters_held": list(held)}
        dist.barrier()
    return results


def _watch_the_masters() -> list[bool]:
    """The EMA update runs beside the next step: the masters must not change before it is done.
    Each update is held until the trainer next waits for it (`settle`), so that an optimizer step
    the trainer lets run before that wait (DeepSpeed's comes inside the last backward) would change
    them under it. One entry per update: whether the masters stayed as they were."""
    import time

    from pixeldit.parallel import ema

    held, lerp, settle, settles = [], ema._lerp, ema.ShardedEMA.settle, [0]

    def counted_settle(self):
        settles[0] += 1
        settle(self)

    def watched(shadow, masters, weight):
        before, seen = [m.clone() for m in masters], settles[0]
        deadline = time.monotonic() + 5  # bounds the rare wait for a settle that came before this line
        while settles[0] == seen and time.monotonic() < deadline:
            time.sleep(0.001)
        lerp(shadow, masters, weight)
        held.append(all(torch.equal(b, m) for b, m in zip(before, masters)))
    ema._lerp, ema.ShardedEMA.settle = watched, counted_settle
    return held


def _zero_moments(trainer) -> dict:
    """Full AdamW moments per parameter, gathered from the ZeRO partitions (a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state
    return {f"{n}/{key}": safe_get_full_optimizer_state(p, key).detach().clone()
            for n, p in trainer.strategy.module.named_parameters() for key in ("exp_avg", "exp_avg_sq")}


def _zero_steps(trainer) -> set[int]:
    return {int(s["step"]) for s in trainer.strategy.engine.optimizer.optimizer.state.values()}


def _full_ema(per_rank, shapes):
    full = {n: torch.full((torch.Size(s).numel(),), float("nan")) for n, s in shapes.items()}
    for frags in per_rank:
        for name, start, tensor in frags:
            full[name][start:start + tensor.numel()] = tensor
    return {n: t.view(shapes[n]) for n, t in full.items()}


@pytest.fixture(scope="module")
def runs(synthetic_shards, tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))
    root = str(tmp_path_factory.mktemp("trainer"))
    plan = [("ddp", "ddp", "fp32", None), ("ddp_resumed", "ddp", "fp32", "ddp"),
            ("fsdp", "fsdp", "fp32", None), ("fsdp_resumed", "fsdp", "fp32", "fsdp"),
            ("zero1", "zero1", "fp32", None),
            ("zero2", "zero2", "fp32", None), ("zero2_resumed", "zero2", "fp32", "zero2"),
            ("zero3", "zero3", "fp32", None), ("zero3_resumed", "zero3", "fp32", "zero3"),
            ("ddp_bf16", "ddp", "bf16", None), ("fsdp_bf16", "fsdp", "bf16", None),
            ("zero2_bf16", "zero2", "bf16", None)]
    per_rank = run_distributed(_run, 2, synthetic_shards, root, plan, timeout=900)
    return {"root": root, "rank0": per_rank[0], "ranks": per_rank}


def test_every_strategy_gives_the_ddp_loss_curve_in_fp32(runs):
    ref = runs["rank0"]["ddp"]["losses"]
    assert len(ref) == STEPS and ref[-1] < ref[0] * 1.5
    for name in ("fsdp", "zero1", "zero2", "zero3"):
        losses = runs["rank0"][name]["losses"]
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
        assert rel < 1e-5, (name, rel, losses, ref)


def test_bf16_strategies_agree_within_the_measured_tolerance(runs):
    # measured on this CPU over 6 steps: fsdp / zero2 / zero3 (bf16 compute weights) vs ddp (autocast)
    # differ by 3.5e-5 to 4.4e-5 relative; the bound leaves ~10x margin
    ref = runs["rank0"]["ddp_bf16"]["losses"]
    fp32 = runs["rank0"]["ddp"]["losses"]
    for name in ("fsdp_bf16", "zero2_bf16"):
        losses = runs["rank0"][name]["losses"]
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
        assert rel < 5e-4, (name, rel)
    assert max(abs(a - b) / abs(b) for a, b in zip(ref, fp32)) < 5e-4


def test_no_optimizer_step_changes_the_masters_under_an_ema_update(runs):
    for r in range(2):
        for name, result in runs["ranks"][r].items():
            expected = STEPS // 2 if name.endswith("_resumed") else STEPS
            assert result["masters_held"] == [True] * expected, (r, name, result["masters_held"])


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_resume_is_bit_identical(runs, name):
    straight, resumed = runs["rank0"][name], runs["rank0"][f"{name}_resumed"]
    assert resumed["losses"] == straight["losses"][STEPS // 2:]
    for key, value in straight["weights"].items():
        assert torch.equal(value, resumed["weights"][key]), key
    for r in range(2):
        for (n1, s1, t1), (n2, s2, t2) in zip(runs["ranks"][r][name]["ema"], runs["ranks"][r][f"{name}_resumed"]["ema"]):
            assert (n1, s1) == (n2, s2) and torch.equal(t1, t2), n1


@pytest.mark.parametrize("name", ["zero2", "zero3", "fsdp", "ddp"])
def test_ema_written_by_two_ranks_loads_in_one_process(runs, name):
    from pixeldit.parallel.ema import load_full_ema

    shapes = {k: tuple(v.shape) for k, v in runs["rank0"]["ddp"]["weights"].items()}
    path = os.path.join(runs["root"], name, "checkpoints", f"step_{STEPS:08d}", "ema")
    loaded = load_full_ema(path, shapes)
    expected = _full_ema([runs["ranks"][r][name]["ema"] for r in range(2)], shapes)
    for key in shapes:
        assert torch.equal(loaded[key], expected[key]), key
    if name in ("fsdp", "zero3"):  # sharded: each rank keeps about half the EMA
        total = sum(t.numel() for t in expected.values()) * 4
        assert runs["rank0"][name]["ema_bytes"] < 0.6 * total
    # EMA of a trained model differs from its weights but is close to them after warm-up
    weights = runs["rank0"][name]["weights"]
    assert any(not torch.equal(loaded[k], weights[k]) for k in shapes)


def _one_rank_stalls(rank, world, data, root):
    import time

    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    cfg = load_config(None, _overrides(data, "ddp", 6) + ["distributed.timeout_s=5"])
    trainer = Trainer(cfg, root)
    if rank == 1:
        real = trainer.train_step

        def stall(batch):
            if trainer.state.step == 2:
                time.sleep(15)  # stops answering, then leaves
                raise KeyboardInterrupt
            return real(batch)
        trainer.train_step = stall
    try:
        trainer.fit()
    except RuntimeError as e:  # gloo's own error, with the trainer's note naming rank and step
        return [type(e).__name__, str(e), *getattr(e, "__notes__", [])]
    except KeyboardInterrupt:
        return "left"
    return "finished"


def test_a_rank_that_stops_answering_is_an_error_naming_rank_and_step(synthetic_shards, tmp_path):
    results = run_distributed(_one_rank_stalls, 2, synthetic_shards, str(tmp_path), timeout=120)
    assert results[0][-1] == ("rank 0 of 2: step 3 failed; if a peer died or stopped answering, see "
                              "distributed.timeout_s=5"), results[0]
    assert not results[0][1].startswith("rank 0 of 2")  # gloo's own message and type, not a rewording
    assert results[1] == "left"


def _resume_on_one(rank, world, data, root, source):
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    cfg = load_config(None, _overrides(data, "fsdp", STEPS))
    trainer = Trainer(cfg, root)
    trainer.resume(os.path.join(source, "checkpoints", f"step_{STEPS:08d}"))
    weights = trainer.strategy.checkpoint.full_state_dict()
    ema = {f.name: s.clone() for f, s in zip(trainer.ema.fragments, trainer.ema.shadow)}
    optimizer_steps = {int(v["step"]) for v in trainer.strategy.optimizer.state.values()}
    return {"weights": weights, "ema": ema, "epoch": trainer.loader.epoch, "batches": trainer.loader.batches_done,
            "optimizer_steps": optimizer_steps}


def test_fsdp_checkpoint_of_two_ranks_resumes_on_one(runs, synthetic_shards, tmp_path):
    out = run_distributed(_resume_on_one, 1, synthetic_shards, str(tmp_path), os.path.join(runs["root"], "fsdp"),
                          timeout=300)[0]
    for key, value in runs["rank0"]["fsdp"]["weights"].items():
        assert torch.equal(out["weights"][key], value), key
    shapes = {k: tuple(v.shape) for k, v in runs["rank0"]["ddp"]["weights"].items()}
    expected = _full_ema([runs["ranks"][r]["fsdp"]["ema"] for r in range(2)], shapes)
    for key, value in out["ema"].items():
        assert torch.equal(value.view(shapes[key]), expected[key]), key
    assert out["optimizer_steps"] == {STEPS}  # AdamW moments and step counts came along
    # 6 steps x 8 samples of 230: the same global position, in the one-rank layout
    assert (out["epoch"], out["batches"]) == (0, STEPS)


def _zero_on_another_world(rank, world, data, root, source, saved_step, train=True):
    """Resume each ZeRO stage's checkpoint of `saved_step` (written by another world size), train one step."""
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    out = {}
    for strategy in ("zero2", "zero3"):
        trainer = Trainer(load_config(None, _overrides(data, strategy, saved_step + 1)), os.path.join(root, strategy))
        trainer.resume(os.path.join(source, strategy, "checkpoints", f"step_{saved_step:08d}"))
        loaded = {"weights": trainer.strategy.checkpoint.full_state_dict(), "moments": _zero_moments(trainer),
                  "steps": _zero_steps(trainer), "ema": {f.name: s.clone() for f, s in zip(trainer.ema.fragments,
                                                                                          trainer.ema.shadow)},
                  "position": (trainer.loader.epoch, trainer.loader.batches_done)}
        trained = None
        if train:
            state = trainer.fit()
            trained = {"weights": trainer.strategy.checkpoint.full_state_dict(), "moments": _zero_moments(trainer),
                       "steps": _zero_steps(trainer), "losses": list(state.history), "step": state.step}
        out[strategy] = {"loaded": loaded, "trained": trained} if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def zero_on_one(runs, synthetic_shards, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("zero_on_one"))
    out = run_distributed(_zero_on_another_world, 1, synthetic_shards, root, runs["root"], STEPS, timeout=600)[0]
    return {"root": root, "out": out}


def _assert_equal(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_checkpoint_of_two_ranks_resumes_on_one(runs, zero_on_one, name):
    loaded, trained = zero_on_one["out"][name]["loaded"], zero_on_one["out"][name]["trained"]
    saved = runs["rank0"][name]
    _assert_equal(loaded["weights"], saved["weights"])
    _assert_equal(loaded["moments"], saved["moments"])  # AdamW moments came along, bit for bit ...
    assert loaded["steps"] == {STEPS}  # ... and the step count (bias correction)
    shapes = {k: tuple(v.shape) for k, v in saved["weights"].items()}
    expected = _full_ema([runs["ranks"][r][name]["ema"] for r in range(2)], shapes)
    _assert_equal({k: v.view(shapes[k]) for k, v in loaded["ema"].items()}, expected)
    assert loaded["position"] == (0, STEPS)
    # one more step on one rank: a real update from the loaded state
    assert trained["step"] == STEPS + 1 and trained["steps"] == {STEPS + 1} and len(trained["losses"]) == 1
    assert all(not torch.equal(trained["weights"][k], v) for k, v in loaded["weights"].items() if "weight" in k)
    converted = os.path.join(runs["root"], name, "checkpoints", f"step_{STEPS:08d}", "engine", "universal")
    assert os.path.exists(os.path.join(converted, "converted.json"))


def test_zero_checkpoint_of_one_rank_resumes_on_two(zero_on_one, synthetic_shards, tmp_path):
    # the checkpoints of step 7 that the one-rank runs above wrote
    per_rank = run_distributed(_zero_on_another_world, 2, synthetic_shards, str(tmp_path), zero_on_one["root"],
                               STEPS + 1, False, timeout=600)
    for name in ("zero2", "zero3"):
        saved, loaded = zero_on_one["out"][name]["trained"], per_rank[0][name]["loaded"]
        _assert_equal(loaded["weights"], saved["weights"])
        _assert_equal(loaded["moments"], saved["moments"])
        assert loaded["steps"] == {STEPS + 1}
