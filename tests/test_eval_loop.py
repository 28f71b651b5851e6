"""FID in the training loop: EMA samples on every rank, one all-reduce of Inception statistics."""

import os

import numpy as np
import pytest
import torch

from pixeldit.platform.config import ConfigError, load_config
from tests.dist import run_distributed
from tests.encoders import fid_inception_state


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    """Random Inception weights in pytorch-fid's layout and a small reference batch of images."""
    root = tmp_path_factory.mktemp("fid")
    torch.save(fid_inception_state(), root / "inception.pth")
    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3)).astype(np.uint8)
    np.savez(root / "reference.npz", arr_0=images)
    return str(root / "inception.pth"), str(root / "reference.npz")


def overrides(data, inception, reference, steps=2):
    return [f"data.source={data}", "data.image_size=16", "model.patch_size=4", "train.global_batch=8",
            "train.micro_batch=4", f"train.steps={steps}", "checkpoint.every_steps=100", "logging.every_steps=1",
            "eval.every_steps=2", "eval.num_images=6", "eval.batch_size=4", "eval.steps=3", "eval.cfg_scale=2.0",
            "eval.cfg_interval=[0.1, 0.9]", f"eval.inception={inception}", f"eval.reference={reference}"]


def test_fid_in_the_loop_is_logged_with_a_grid(synthetic_shards, fid_files, tmp_path):
    from pixeldit.platform.trainer import Trainer
    from tests.test_trainer import scalars
    trainer = Trainer(load_config(None, overrides(synthetic_shards, *fid_files)), str(tmp_path))
    trainer.fit()
    acc = scalars(str(tmp_path))
    fid = acc.Scalars("eval/fid_6")
    assert [e.step for e in fid] == [2] and np.isfinite(fid[0].value) and fid[0].value > 0
    # 3 AB2 steps with CFG on (0.1, 0.9): t = 0 unguided, 1/3 and 2/3 guided -> 5 evaluations per image
    assert acc.Scalars("eval/image_evaluations_per_image")[0].value == 5
    image = acc.Images("eval/samples")[0]
    assert (image.width, image.height) == (6 * 17 + 1, 17 + 1)  # 6 images of 16 px in one row (up to 8)


def test_eval_sampling_does_not_depend_on_the_world_size(synthetic_shards, fid_files, tmp_path):
    """The same EMA weights evaluated on 1 and 2 ranks give the same statistics (sums in float64)."""
    inception, reference = fid_files
    export = str(tmp_path / "weights.pt")
    one = run_distributed(_evaluate_fixed, 1, synthetic_shards, str(tmp_path / "a"), inception, reference, export,
                          timeout=300)[0]
    two = run_distributed(_evaluate_fixed, 2, synthetic_shards, str(tmp_path / "b"), inception, reference, export,
                          timeout=300)[0]
    assert abs(one["eval/fid_6"] - two["eval/fid_6"]) <= 1e-6 * one["eval/fid_6"]
    # and the same grid: image i sits at position i whichever rank sampled it
    grids = [_grid(str(tmp_path / name)) for name in ("a", "b")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1


def _grid(run_dir):
    import io

    from PIL import Image

    from tests.test_trainer import scalars
    encoded = scalars(run_dir).Images("eval/samples")[-1].encoded_image_string
    return np.asarray(Image.open(io.BytesIO(encoded)), dtype=np.int16)


def _evaluate_fixed(rank, world, data, run_dir, inception, reference, weights_path):
    import torch.distributed as dist

    from pixeldit.platform.eval_loop import InLoopEvaluator, eval_spec
    from pixeldit.platform.trainer import Trainer
    trainer = Trainer(load_config(None, overrides(data, inception, reference, steps=1)), run_dir)
    if world == 1:  # fixed, non-trivial EMA weights shared by both runs
        for shadow in trainer.ema.shadow:
            shadow.copy_(torch.randn(shadow.shape, generator=torch.Generator().manual_seed(shadow.numel())))
        torch.save([f.name for f in trainer.ema.fragments], weights_path + ".names")
        full = {f.name: s.clone() for f, s in zip(trainer.ema.fragments, trainer.ema.shadow)}
        torch.save(full, weights_path)
    else:
        full = torch.load(weights_path)
        for f, shadow in zip(trainer.ema.fragments, trainer.ema.shadow):
            shadow.copy_(full[f.name].view(-1)[f.start:f.start + shadow.numel()].view(shadow.shape))
    if dist.is_initialized():
        dist.barrier()
    trainer.monitor.start(0, ["evaluation only"])  # opens the trackers, as fit() does before its first step
    evaluator = InLoopEvaluator(eval_spec(trainer.cfg), trainer.arch, trainer.device, trainer.rank, trainer.world)
    result = evaluator.run(trainer.ema, trainer.state.step, trainer.monitor)
    trainer.monitor.close()
    return result


def test_fid_needs_a_reference_batch():
    with pytest.raises(ConfigError, match="eval.reference"):
        load_config(None, ["eval.every_steps=10", "eval.inception=/x/inception.pth"])
    assert os.environ.get("OMP_NUM_THREADS") == "1"
