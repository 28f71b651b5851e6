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
    cfg = load_config(None, ["optim.lr=5e-5", "optim.betas=[0.9, 0.95]", "distributed.strategy=fsdp",
                             "model.variant=dit", "schedule.stages=[{start: 0, lr: 1e-4}, {start: 100, lr: 1e-5, clip: 0.5}]"])
    assert cfg.optim.lr == 5e-5
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.distributed.strategy == "fsdp"
    assert cfg.model.arch().variant == "dit"
    assert [(s.start, s.lr, s.clip) for s in cfg.schedule.stages] == [(0, 1e-4, 1.0), (100, 1e-5, 0.5)]


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_config(None, ["train.steps=2.5"])


@pytest.mark.parametrize("override, path", [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("nosection.x=1", "nosection: unknown key"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.hflip=1", "data.hflip: expected true or false"),
    ("distributed.strategy=zero4", "distributed.strategy: 'zero4' is not one of"),
    ("schedule.stages=[{start: 0}, {start: 5, lr: x}]", r"schedule\.stages\[1\]\.lr: expected a number"),
    ("schedule.stages=[{start: 0}, {start: 5, bogus: 1}]", r"schedule\.stages\[1\]\.bogus: unknown key"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
])
def test_bad_values_name_the_key_path(override, path):
    with pytest.raises(ConfigError, match=path):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("train.global_batch=12", "train.global_batch=12 is not divisible by train.micro_batch=16"),
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
    assert "optim.lrr: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
