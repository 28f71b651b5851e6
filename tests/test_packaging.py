"""What an installed wheel carries: every shipped config, not only those at the top of configs/."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_data_ships_every_config():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pixeldit"]
    package = ROOT / "pixeldit"
    configs = sorted(p.relative_to(package).as_posix() for p in (package / "configs").rglob("*.yaml"))
    assert "configs/imagenet256/pixeldit_xl.yaml" in configs and "configs/demo.yaml" in configs
    # setuptools globs do not cross folders: configs/*.yaml misses configs/imagenet256/
    unshipped = [c for c in configs if not any(fnmatch.fnmatch(c, g) and c.count("/") == g.count("/") for g in globs)]
    assert unshipped == []
