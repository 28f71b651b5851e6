"""`pixeldit sample`: determinism across batch and world size, resume, the .npz format, model sources."""

import contextlib
import io
import os

import numpy as np
import pytest
import torch

from pixeldit.diffusion import sample
from pixeldit.diffusion.samplers import initial_noise
from pixeldit.evaluation.sampling import evaluations_per_image, sample_to_npz
from pixeldit.evaluation.sampling_plan import SamplingPlan
from pixeldit.jobs.sample import load_sampling_model
from pixeldit.models import build_model, resolve_arch
from tests.dist import run_distributed

SIZE = 32
SETTINGS = dict(classes=[1, 4, 7], per_class=4, image_size=SIZE, seed=5, sampler="ab2", steps=4, cfg_scale=2.0,
                cfg_interval=(0.2, 0.9), progress=False)
# measured on this CPU (1 thread): float images of batch 1, 2, 3, 5 vs batch 4 differ by at most 9.5e-7 abs
# (4 AB2 steps with CFG), 1.2e-6 over 25 Heun steps; the bound leaves ~10x margin. In uint8 no value moved.
FLOAT_TOLERANCE = 1e-5


def tiny_model(seed=0):
    """pixeldit-tiny with every weight random: the zero-initialised gates would make v ≡ 0."""
    torch.manual_seed(seed)
    model = build_model("pixeldit-tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.08)  # RMSNorm gains stay 1
        model.final_layer.linear.weight.normal_(0.0, 0.3)  # |v| ~ 1: the images are not the noise alone
        model.y_embedder.embedding_table.weight.normal_(0.0, 1.0)  # labels (and so CFG) visibly matter
    return model.eval()


def read(path):
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


def count_images(model):
    """Images pushed through the model, counted at its input."""
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    return seen


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted single-process run, batch 4."""
    out = str(tmp_path_factory.mktemp("reference") / "samples.npz")
    report = sample_to_npz(model, out, batch_size=4, **SETTINGS)
    return out, report


# ---------------------------------------------------------------- format


def test_npz_holds_uint8_images_in_image_order_with_their_labels(model, reference):
    out, report = reference
    images, labels = read(out)
    assert images.dtype == np.uint8 and images.shape == (12, SIZE, SIZE, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 4, 7] * 4  # interleaved classes
    assert report.images == report.computed == 12 and not os.path.exists(out + ".parts")
    # the same images computed in one batch: noise from (seed, i), label classes[i % len(classes)]
    x = sample(model, torch.from_numpy(labels), range(12), (3, SIZE, SIZE), null_class=10, seed=5, steps=4,
               cfg_scale=2.0, cfg_interval=(0.2, 0.9)).images
    x = x.permute(0, 2, 3, 1).numpy()
    expected = np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)  # ADM's conversion, floor by the cast
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    assert (images != expected).mean() < 1e-3
    assert len(np.unique(images)) > 100 and images.std() > 20  # not a blank or saturated field


def test_noise_and_labels_do_not_depend_on_the_batch():
    together = initial_noise(5, range(8), (3, SIZE, SIZE))
    alone = torch.cat([initial_noise(5, [i], (3, SIZE, SIZE)) for i in range(8)])
    assert torch.equal(together, alone)
    assert not torch.equal(initial_noise(6, [0], (3, SIZE, SIZE)), alone[:1])


def test_batch_size_changes_images_only_within_rounding(model, reference, tmp_path):
    labels = SamplingPlan.interleaved([1, 4, 7], 12, seed=5, image_size=SIZE).labels

    def images(batches):
        return torch.cat([sample(model, labels[idx], idx, (3, SIZE, SIZE), null_class=10, seed=5, steps=4,
                                 cfg_scale=2.0, cfg_interval=(0.2, 0.9)).images for idx in batches])

    x3 = images([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    x8 = images([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]])
    assert (x3 - x8).abs().max() < FLOAT_TOLERANCE
    out = str(tmp_path / "b3.npz")
    sample_to_npz(model, out, batch_size=3, **SETTINGS)
    images3, labels3 = read(out)
    images4, labels4 = read(reference[0])
    assert np.array_equal(labels3, labels4)
    assert np.abs(images3.astype(int) - images4.astype(int)).max() <= 1
    assert (images3 != images4).mean() < 1e-3


def _sample_on_ranks(rank, world, state_path, out, run_dir, cli_args, port):
    import torch.distributed as dist

    from pixeldit.cli import main

    model = build_model("pixeldit-tiny")
    model.load_state_dict(torch.load(state_path, weights_only=True))
    report = sample_to_npz(model.eval(), out, batch_size=4, **SETTINGS)
    library = (report.computed, report.image_evaluations, os.path.exists(out))
    # then the command as torchrun starts it: no process group yet, RANK / WORLD_SIZE / MASTER_* set
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)  # the first group's store may still hold the old port
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["sample", run_dir, *cli_args])
    return library, (rc, printed.getvalue())


def test_two_processes_write_the_one_process_file(model, reference, tiny_run, tmp_path):
    from pixeldit.cli import main
    from tests.dist import free_port

    state = str(tmp_path / "model.pt")
    torch.save(model.state_dict(), state)
    out = str(tmp_path / "two.npz")
    cli_args = ["--classes", "2-4", "--per-class", "3", "--steps", "3", "--batch-size", "2", "--cfg-scale", "1.5",
                "--seed", "7", "--out"]
    results = run_distributed(_sample_on_ranks, 2, state, out, tiny_run["run"],
                              [*cli_args, str(tmp_path / "cli_two.npz")], free_port(), timeout=120)
    # same batch size: batch k goes to rank k mod 2, so each batch holds the same images as in one process
    images, labels = read(out)
    ref_images, ref_labels = read(reference[0])
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)
    per_image = evaluations_per_image("ab2", 4, 1.0, 2.0, (0.2, 0.9))
    for library, _ in results:
        assert library == (12, 12 * per_image, True)  # totals over both ranks; no rank returns before the file
    # the command: process group from the environment, the run's EMA consolidated through DCP on each rank
    (rc0, printed0), (rc1, printed1) = (command for _, command in results)
    assert rc0 == rc1 == 0 and "batch 2 x 2 process(es)" in printed0 and printed1 == ""  # rank 0 reports
    assert main(["sample", tiny_run["run"], *cli_args, str(tmp_path / "cli_one.npz")]) == 0
    two, one = read(str(tmp_path / "cli_two.npz")), read(str(tmp_path / "cli_one.npz"))
    assert two[0].shape == (9, 16, 16, 3) and np.array_equal(two[1], one[1]) and np.array_equal(two[0], one[0])


# ---------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_redoing_finished_images(reference, tmp_path):
    model = tiny_model()
    out = str(tmp_path / "resumed.npz")
    parts = out + ".parts"

    def stop_after_first(indices):
        raise Interrupt(indices)

    with pytest.raises(Interrupt):
        sample_to_npz(model, out, batch_size=4, on_part=stop_after_first, **SETTINGS)
    assert sorted(os.listdir(parts)) == ["part_00000000.npz", "settings.json"] and not os.path.exists(out)
    with open(os.path.join(parts, ".part_00000004.npz.tmp.123"), "wb") as f:
        f.write(b"half a write")  # what a kill during a write leaves

    with pytest.raises(ValueError, match=r"resumed\.npz\.parts holds parts sampled with other settings \(steps"):
        sample_to_npz(model, out, batch_size=4, **{**SETTINGS, "steps": 5})
    other = tiny_model(seed=1)
    with pytest.raises(ValueError, match=r"other settings \(weights"):
        sample_to_npz(other, out, batch_size=4, **SETTINGS)

    seen = count_images(model)
    report = sample_to_npz(model, out, batch_size=4, **SETTINGS)
    per_image = evaluations_per_image("ab2", 4, 1.0, 2.0, (0.2, 0.9))
    assert report.computed == 8 and sum(seen) == 8 * per_image == report.image_evaluations
    images, labels = read(out)
    ref_images, ref_labels = read(reference[0])
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)
    assert not os.path.exists(parts)


def test_resume_with_another_batch_size_fills_the_gaps(model, reference, tmp_path):
    out = str(tmp_path / "gaps.npz")
    folder = out + ".parts"
    done = []

    def stop_after_second(indices):
        done.append(indices)
        if len(done) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        sample_to_npz(model, out, batch_size=5, on_part=stop_after_second, **SETTINGS)
    assert done == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    os.remove(os.path.join(folder, "part_00000000.npz"))  # a hole before a finished part
    finished = []
    report = sample_to_npz(model, out, batch_size=4, on_part=finished.append, **SETTINGS)
    assert finished == [[0, 1, 2, 3], [4, 10, 11]] and report.computed == 7
    images, _ = read(out)
    ref_images, _ = read(reference[0])
    assert np.abs(images.astype(int) - ref_images.astype(int)).max() <= 1


# ---------------------------------------------------------------- evaluation counts


def test_cfg_interval_evaluation_count_is_exact(model, tmp_path):
    assert evaluations_per_image("ab2", 100, 1.0, 2.75, (0.1, 0.9)) == 179  # t = 0.11 .. 0.89 guided
    assert evaluations_per_image("ab2", 100, 1.0, 1.0, (0.1, 0.9)) == 100  # scale 1: never an uncond pass
    assert evaluations_per_image("heun", 10) == 19
    # 10 steps, t = 0, 0.1, ..., 0.9; (0.1, 0.9) is open: 0.2 .. 0.8 are guided
    assert evaluations_per_image("euler", 10, 1.0, 3.0, (0.1, 0.9)) == 17
    seen_model = tiny_model()
    seen = count_images(seen_model)
    report = sample_to_npz(seen_model, str(tmp_path / "count.npz"), classes=[2, 3], per_class=3, image_size=16,
                           sampler="heun", steps=10, cfg_scale=3.0, cfg_interval=(0.1, 0.9), batch_size=4,
                           progress=False)
    # heun: calls at t_i and correctors at t_{i+1} < 1: 0.2 .. 0.8 guided twice each
    predicted = evaluations_per_image("heun", 10, 1.0, 3.0, (0.1, 0.9))
    assert predicted == 19 + 7 + 7
    assert sum(seen) == 6 * predicted == report.image_evaluations == report.evaluations_per_image * 6


# ---------------------------------------------------------------- model sources


@pytest.fixture(scope="module")
def tiny_run(synthetic_shards, tmp_path_factory):
    from pixeldit.platform.config import load_config
    from pixeldit.platform.export import export_checkpoint
    from pixeldit.platform.trainer import Trainer

    root = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"data.source={synthetic_shards}", "data.image_size=16", "model.patch_size=4",
                             "model.hidden_size=64", "train.global_batch=4", "train.micro_batch=4",
                             "train.steps=2", "checkpoint.every_steps=2", "logging.tensorboard=false",
                             "logging.sample_every_steps=0", "ema.warmup=true", "diffusion.time_shift=2.0"])
    trainer = Trainer(cfg, str(root / "run"))
    trainer.fit()
    export = str(root / "tiny.safetensors")
    export_checkpoint(str(root / "run"), export)
    ema = {f.name[len("model."):]: s.view(f.shape).clone()
           for f, s in zip(trainer.ema.fragments, trainer.ema.shadow, strict=True)}
    trained = {k: v.clone() for k, v in trainer.strategy.module.model.state_dict().items()}
    return {"run": str(root / "run"), "export": export, "ema": ema, "trained": trained}


def assert_weights(model, expected):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name


def test_run_directory_checkpoint_folders_and_export_load_the_ema(tiny_run):
    run = tiny_run["run"]
    assert any(not torch.equal(tiny_run["ema"][k], v) for k, v in tiny_run["trained"].items())
    for source in (run, os.path.join(run, "checkpoints"), os.path.join(run, "checkpoints", "step_00000002"),
                   tiny_run["export"]):
        model, info = load_sampling_model(source)
        assert not model.training and info.weights == "ema" and info.step == 2
        assert (info.image_size, info.time_shift) == (16, 2.0), source
        assert_weights(model, tiny_run["ema"])
    model, info = load_sampling_model(run, weights="model")
    assert_weights(model, tiny_run["trained"])
    model, info = load_sampling_model(tiny_run["export"], weights="model")
    assert info.kind == "export"
    assert_weights(model, tiny_run["trained"])


def test_authors_checkpoint_loads_its_ema_denoiser(tmp_path):
    from tests.test_checkpoint_import import authors_checkpoint

    ckpt = authors_checkpoint(resolve_arch("pixeldit-tiny"), seed=2)
    path = str(tmp_path / "pixeldit_c2i.ckpt")
    torch.save(ckpt, path)
    for weights, prefix in (("ema", "ema_denoiser."), ("model", "denoiser.")):
        model, info = load_sampling_model(path, weights=weights)
        assert info.kind == "authors" and info.image_size is None
        assert_weights(model, {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    del_ema = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema_denoiser.")}
    torch.save({"state_dict": del_ema}, path)
    with pytest.raises(KeyError, match=r"pixeldit_c2i\.ckpt: has no ema_denoiser\.\* weights"):
        load_sampling_model(path)


# ---------------------------------------------------------------- the command


def test_cli_samples_an_export_end_to_end(tiny_run, tmp_path, capsys):
    from pixeldit.cli import main

    out, grid = str(tmp_path / "cli" / "samples.npz"), str(tmp_path / "grid.png")
    rc = main(["sample", tiny_run["export"], "--out", out, "--classes", "0-1,5", "--per-class", "2",
               "--steps", "10", "--cfg-scale", "2.75", "--cfg-interval", "0.1", "0.9", "--batch-size", "4",
               "--grid", grid, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    images, labels = read(out)
    assert images.shape == (6, 16, 16, 3) and labels.tolist() == [0, 1, 5, 0, 1, 5]
    # the run's time shift 2, from the export's metadata, moves the grid's t = 0.9 to 9/11 inside (0.1, 0.9):
    # t = 2/18 .. 9/11 guided, 8 of 10 steps
    assert "time shift 2," in printed
    assert "18 image-evaluations per image (10 velocity calls, 8 of them guided), 108 in total" in printed
    from PIL import Image
    assert main(["sample", tiny_run["export"], "--out", out, "--classes", "9-10"]) == 2
    assert "classes [10]: this model has classes 0..9" in capsys.readouterr().err
    assert Image.open(grid).size == (6 * 18 + 2, 18 + 2)  # 6 images (fewer than 8 per row): one row, 2 px padding


def test_cli_names_a_bad_source(tmp_path, capsys):
    from pixeldit.cli import main

    missing = str(tmp_path / "nowhere.safetensors")
    assert main(["sample", missing, "--out", str(tmp_path / "x.npz")]) == 2
    assert f"pixeldit sample: error: {missing}: no such file or directory" in capsys.readouterr().err
    for name in ("junk.safetensors", "junk.ckpt"):
        path = tmp_path / name
        path.write_bytes(b"\x00not a checkpoint" * 10)
        assert main(["sample", str(path), "--out", str(tmp_path / "x.npz")]) == 2
        err = capsys.readouterr().err
        assert f"error: {path}: not a" in err, err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["sample", str(empty), "--out", str(tmp_path / "x.npz")]) == 2
    assert f"{empty}: no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(empty), "--out", "x.npz", "--classes", "3-1"])
    from pixeldit.diffusion import SAMPLERS
    from pixeldit.jobs.sample_arguments import SAMPLERS as CHOICES
    assert CHOICES == SAMPLERS  # the argument module keeps its own copy to stay free of torch

