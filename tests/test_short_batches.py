"""A rank whose batch came short (the loader skipped corrupt samples) runs as many forward / backward
passes as the others: FSDP gathers and reduces in each, so one pass fewer would hang the step."""

import os

import torch

from tests.dist import run_distributed


def _steps(rank, world, data, root, strategy):
    from pixeldit.platform.config import load_config
    from pixeldit.platform.trainer import Trainer

    cfg = load_config(None, [f"data.source={data}", "data.image_size=16", "model.patch_size=4",
                             f"distributed.strategy={strategy}", "distributed.precision=fp32",
                             "train.global_batch=8", "train.micro_batch=2", "train.steps=2",
                             "logging.tensorboard=false"])
    trainer = Trainer(cfg, os.path.join(root, strategy))
    assert (trainer.layout.per_rank, trainer.layout.accumulation) == (4, 2)
    batches = iter(trainer.loader)
    full = next(batches)
    # rank 1 lost 3 of its 4 samples: its second micro-batch has none left (a stand-in runs)
    short = {k: v[:1] for k, v in full.items()} if rank == 1 else full
    first = trainer.train_step(short)
    # a batch with no sample at all on rank 1 (every sample skipped): two stand-ins
    empty = {k: v[:0] for k, v in next(batches).items()} if rank == 1 else next(batches)
    second = trainer.train_step(empty)
    per_sample = [(int(i), k) for i, k in zip(short["index"], short["key"])]
    weights = trainer.strategy.checkpoint.full_state_dict()
    trainer.loader.close()
    return {"first": first, "second": second, "samples": per_sample, "weights": weights if rank == 0 else None}


def test_a_short_rank_batch_neither_hangs_nor_counts_its_stand_ins(synthetic_shards, tmp_path):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))
    results = {}
    for strategy in ("ddp", "fsdp"):
        ranks = run_distributed(_steps, 2, synthetic_shards, str(tmp_path), strategy, timeout=300)
        assert [r["first"]["samples"] for r in ranks] == [5, 5]  # 4 + 1 real samples, stand-ins not counted
        assert [r["second"]["samples"] for r in ranks] == [4, 4]
        assert all(r["first"]["stepped"] and r["second"]["stepped"] for r in ranks)
        assert len(ranks[1]["samples"]) == 1
        results[strategy] = ranks
    # the same step under both strategies: the stand-ins add exactly nothing to either
    for step in ("first", "second"):
        assert results["ddp"][0][step]["loss"] == results["fsdp"][0][step]["loss"]
    ddp, fsdp = results["ddp"][0]["weights"], results["fsdp"][0]["weights"]
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-6, atol=1e-7, msg=name)
