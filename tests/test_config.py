import subprocess
import sys

import pytest
import yaml

from pixeldit.platform.config import DEFAULT_CONFIG, Config, ConfigError, config_from_dict, load_config


def test_default_config_loads_and_round_trips(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "pixeldit-tiny"
    out = tmp_path / "resolved.yaml"
    out.write_text(cfg.to_yaml())
    assert load_config(out) == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.eps=1e-6", "optim.betas=[0.9, 0.95]", "distributed.strategy=fsdp",
                             "model.variant=dit", "schedule.stages=[{start: 0, lr: 1e-4}, {start: 100, lr: 1e-5, clip: 0.5}]"])
    assert cfg.optim.eps == 1e-6
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.distributed.strategy == "fsdp"
    assert cfg.model.arch().variant == "dit"
    assert [(s.start, s.lr, s.clip) for s in cfg.schedule.stages] == [(0, 1e-4, 1.0), (100, 1e-5, 0.5)]


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.eps=1"]).optim.eps == 1.0
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_config(None, ["train.steps=2.5"])


@pytest.mark.parametrize("override, path", [
    ("optim.lrr=1", "unknown key optim.lrr"),
    ("nosection.x=1", "unknown key nosection"),
    ("optim.eps=fast", "optim.eps: expected a number"),
    ("data.hflip=1", "data.hflip: expected true or false"),
    ("distributed.strategy=zero4", "distributed.strategy: 'zero4' is not one of"),
    ("schedule.stages=[{start: 0}, {start: 5, lr: x}]", r"schedule\.stages\[1\]\.lr: expected a number"),
    ("schedule.stages=[{start: 0}, {start: 5, bogus: 1}]", r"schedule\.stages\[1\]\.bogus: unknown key"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("optim.eps=.nan", "optim.eps: expected a finite number"),
    ("train.micro_batch=most", r"train.micro_batch: expected an integer or one of \['auto'\], got 'most'"),
])
def test_bad_values_name_the_key_path(override, path):
    with pytest.raises(ConfigError, match=path):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch=0", "train.micro_batch=0 must be positive"),
    ("data.image_size=30", "data.image_size=30 is not divisible"),
    ("schedule.stages=[{start: 0}, {start: 0}]", r"schedule.stages\[1\].start=0 must be after 0"),
    ("diffusion.label_drop=1.5", "diffusion.label_drop=1.5"),
    ("model.name=pixeldit-xxl", "unknown model 'pixeldit-xxl'"),
    ("eval.cfg_interval=[0.9, 0.1]", "eval.cfg_interval"),
])
def test_cross_field_rules_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: optim.momentum: unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_loads():
    for path in sorted(DEFAULT_CONFIG.parent.rglob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_config_from_dict_matches_yaml():
    tree = yaml.safe_load(load_config().to_yaml())
    assert config_from_dict(tree) == load_config()


def test_cli_config_refuses_bad_key_with_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "pixeldit", "config", "--set", "optim.lrr=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("pixeldit config: error: --set optim.lrr=1: unknown key optim.lrr "
                                   "(did you mean schedule.stages[0].lr?)")


# ---------------------------------------------------------------- the lr has one owner

def test_the_schedule_owns_the_lr_and_an_item_of_a_list_is_settable():
    cfg = load_config(None, ["schedule.stages[0].lr=5e-5", "schedule.stages[1].clip=0.25", "optim.betas[1]=0.95"])
    assert [(s.start, s.lr, s.clip) for s in cfg.schedule.stages] == [(0, 5e-5, 1.0), (1500, 3e-4, 0.25)]
    assert cfg.optim.betas == (0.9, 0.95)
    # what the trainer applies: the stage in force, not a second lr somewhere else
    from pixeldit.platform.schedule import StagedSchedule
    assert StagedSchedule.from_config(cfg.schedule).at(0, 0).lr == 5e-5
    # a config without explicit stages gets the default one, and its lr is settable the same way
    bare = load_config(None, ["schedule.stages[0].lr=2e-4"])
    assert bare.schedule.stages[0].lr == 2e-4


@pytest.mark.parametrize("override, message", [
    # the old place of the lr points at its owner
    ("optim.lr=5e-5", "--set optim.lr=5e-5: unknown key optim.lr (did you mean schedule.stages[0].lr?)"),
    ("model.hiden_size=64", "--set model.hiden_size=64: unknown key model.hiden_size (did you mean model.hidden_size?)"),
    ("optm.betas=[0.9, 0.9]", "--set optm.betas=[0.9, 0.9]: unknown key optm (did you mean optim.betas?)"),
    ("schedule.stages[2].lr=1e-5", "--set schedule.stages[2].lr=1e-5: schedule.stages has 2 item(s) (0..1); to add "
                                   "one, set the whole list"),
    ("schedule.stages.0.lr=1", "--set schedule.stages.0.lr=1: 'schedule.stages.0.lr' is not a key path"),
    ("data.source.bucket=x", "--set data.source.bucket=x: data.source is a value, not a section"),
    ("train.steps", "--set 'train.steps': expected key.path=value"),
    ("schedule.stages=[{start: 0", "--set schedule.stages=[{start: 0: the value is not valid YAML"),
    # type and rule errors name the --set that caused them, not the file
    ("train.steps=2.5", "--set train.steps=2.5: train.steps: expected an integer"),
    ("data.image_size=30", "--set data.image_size=30: data.image_size=30 is not divisible"),
])
def test_set_errors_name_the_set_and_suggest(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value).startswith(message), str(caught.value)
    assert "demo.yaml" not in str(caught.value)


def test_file_errors_suggest_and_name_the_file(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("optim:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"old.yaml: optim.lr: unknown key \(did you mean schedule.stages\[0\].lr\?\)"):
        load_config(old)
    # a rule broken by the file (not by a --set) names the file
    old.write_text("data:\n  image_size: 30\n")
    with pytest.raises(ConfigError, match=r"old.yaml: data.image_size=30"):
        load_config(old, ["train.steps=3"])


# ---------------------------------------------------------------- batch layout at scale

SHIPPED = sorted(DEFAULT_CONFIG.parent.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(DEFAULT_CONFIG.parent)))
def test_every_shipped_config_runs_at_every_advertised_world_size(path):
    from pixeldit.platform.batch_layout import micro_batch_limit
    from pixeldit.errors import LaunchError
    cfg = load_config(path)
    limit = micro_batch_limit(cfg.train.micro_batch)
    for world in (1, 2, 8, 16, 32, 64):
        if path.name == "demo.yaml" and world > cfg.train.global_batch:
            # 16 CPU images per step cannot spread over 32 ranks: refused, with what would work
            with pytest.raises(LaunchError, match=f"over {world} ranks: .* use 16 ranks, or set "
                                                  f"train.global_batch={world}"):
                cfg.train.layout(world)
            continue
        layout = cfg.train.layout(world)
        assert layout.world * layout.per_rank == cfg.train.global_batch
        assert layout.micro_batch * layout.accumulation == layout.per_rank
        assert layout.micro_batch <= limit
        # the largest micro-batch the limit allows: no accumulation beyond what memory asks for
        assert layout.micro_batch == max(d for d in range(1, limit + 1) if layout.per_rank % d == 0)


def test_xl_layout_table_of_the_docs():
    cfg = load_config(DEFAULT_CONFIG.parent / "imagenet256" / "pixeldit_xl.yaml")
    table = {world: (cfg.train.layout(world).per_rank, cfg.train.layout(world).micro_batch,
                     cfg.train.layout(world).accumulation) for world in (1, 8, 16, 32, 64)}
    assert table == {1: (256, 32, 8), 8: (32, 32, 1), 16: (16, 16, 1), 32: (8, 8, 1), 64: (4, 4, 1)}
    assert load_config(None, ["train.global_batch=256", "train.micro_batch=12"]).train.layout(8).micro_batch == 8


def test_a_batch_the_ranks_cannot_share_is_refused_with_what_would_work():
    from pixeldit.errors import LaunchError
    cfg = load_config(DEFAULT_CONFIG.parent / "imagenet256" / "pixeldit_xl.yaml")
    with pytest.raises(LaunchError) as caught:
        cfg.train.layout(48)
    assert str(caught.value) == ("train.global_batch=256 over 48 ranks: the ranks must share it evenly; use 32 or "
                                 "64 ranks, or set train.global_batch=288")
    with pytest.raises(LaunchError, match=r"over 48 ranks \(6 nodes x 8 processes\).*use 4 or 8 nodes of 8, or set "
                                          r"train.global_batch=288"):
        cfg.train.layout(48, per_node=8)
    # the suggestions work
    assert cfg.train.layout(32).per_rank == 8 and cfg.train.layout(64).per_rank == 4
    assert load_config(None, ["train.global_batch=288"]).train.layout(48).per_rank == 6


def test_a_rule_broken_by_a_set_names_the_set_not_the_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, ["train.steps=5", "model.patch_size=5"])
    assert str(e.value) == ("--set model.patch_size=5: data.image_size=32 is not divisible by the model's "
                            "patch size 5")
    # the file's own rule breaks name the file, even with overrides that have nothing to do with them
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  patch_size: 5\n")
    with pytest.raises(ConfigError, match=r"^.*bad\.yaml: data\.image_size=32 is not divisible"):
        load_config(bad, ["train.steps=5"])
    # a value one override breaks and a later one repairs is the user's final intent: accepted
    cfg = load_config(None, ["model.patch_size=5", "data.image_size=40"])
    assert (cfg.model.patch_size, cfg.data.image_size) == (5, 40)


def test_the_cli_names_the_set_that_broke_a_rule():
    out = subprocess.run([sys.executable, "-m", "pixeldit", "config", "--config", str(DEFAULT_CONFIG), "--set",
                          "model.patch_size=5"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("pixeldit config: error: --set model.patch_size=5: data.image_size=32 is not divisible "
                          "by the model's patch size 5\n")


@pytest.mark.parametrize("given", ["configs/imagenet256/pixeldit_xl.yaml", "imagenet256/pixeldit_xl.yaml"])
def test_a_shipped_config_loads_from_any_folder(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    assert load_config(given) == load_config(DEFAULT_CONFIG.parent / "imagenet256" / "pixeldit_xl.yaml")
    # a file of that name in the working directory is the user's and wins over the shipped one
    mine = tmp_path / given
    mine.parent.mkdir(parents=True)
    mine.write_text("train:\n  steps: 7\n")
    assert load_config(given).train.steps == 7
    with pytest.raises(ConfigError, match="config file not found: nowhere/x.yaml"):
        load_config("nowhere/x.yaml")


def test_a_per_rank_batch_without_a_divisor_near_the_limit_warns_once(caplog):
    from pixeldit.platform import batch_layout as layouts

    layouts._warned.clear()
    with caplog.at_level("WARNING", logger=layouts.__name__):
        for _ in range(3):  # the trainer, the strategy and the loader each ask
            layout = layouts.batch_layout(74, "auto", 2)
    assert (layout.per_rank, layout.micro_batch, layout.accumulation) == (37, 1, 37)
    assert [r.getMessage() for r in caplog.records] == [
        "train.global_batch=74 over 2 rank(s) is 37 per rank, whose largest divisor within the micro batch limit "
        "of 32 (train.micro_batch) is 1: 37 micro-batches of 1 per step, slower than need be; "
        "train.global_batch=76 would run micro-batches of 19"]
    suggested = layouts.batch_layout(76, "auto", 2)
    assert suggested.micro_batch == 19
    # a limit that does not divide the per-rank batch shrinks the micro-batch; far below it, that is said too
    caplog.clear()
    with caplog.at_level("WARNING", logger=layouts.__name__):
        assert layouts.batch_layout(22, 8, 1).micro_batch == 2
        assert layouts.batch_layout(48, 32, 1).micro_batch == 24  # half the limit or more: fine, no warning
        assert layouts.batch_layout(256, "auto", 32).micro_batch == 8  # the whole per-rank batch: no warning
    assert len(caplog.records) == 1 and "train.global_batch=22 over 1 rank(s)" in caplog.records[0].getMessage()
    assert "micro-batches of 7" in caplog.records[0].getMessage()
