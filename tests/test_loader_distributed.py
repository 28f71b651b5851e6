from tests.dist import run_distributed


def _epoch_on_rank(rank, world, root):
    import torch
    import torch.distributed as dist

    from pixeldit.platform.config import load_config
    from tests.loaders import config_loader

    cfg = load_config(None, [f"data.source={root}", "data.image_size=16", "train.global_batch=16",
                             "train.micro_batch=8", "data.num_workers=2"])
    loader = config_loader(cfg, rank, world)
    indices = [i for batch in loader for i in batch["index"].tolist()]
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(indices)]))
    gathered = [torch.zeros(int(c), dtype=torch.int64) for c in counts]
    dist.all_gather(gathered, torch.tensor(indices))
    return [g.tolist() for g in gathered]


def test_two_ranks_split_an_epoch_without_overlap_or_loss(synthetic_shards):
    per_rank = run_distributed(_epoch_on_rank, 2, synthetic_shards, timeout=120)
    assert per_rank[0] == per_rank[1]  # both ranks gathered the same view
    rank0, rank1 = per_rank[0]
    assert len(rank0) == len(rank1) == 230 // 16 * 8
    assert not set(rank0) & set(rank1)
    assert len(set(rank0) | set(rank1)) == 230 // 16 * 16
