"""What an installed wheel carries: every shipped config (not only those at the top of configs/), and
the dependencies it declares: webdataset only for the tests and benchmarks, since the package never
imports it."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pixeldit"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel setuptools builds from a copy of the checkout (its build/ and egg-info stay out of the
    checkout, and a stale build/ there cannot leak into it)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "pixeldit", ignore=shutil.ignore_patterns("__pycache__"))
    build = f"from setuptools import build_meta; print(build_meta.build_wheel({str(root / 'dist')!r}))"
    done = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(root / "dist" / done.stdout.split()[-1]) as built:
        yield built


def test_the_wheel_ships_every_config(wheel):
    shipped = {name for name in wheel.namelist() if name.startswith("pixeldit/configs/")}
    configs = {p.relative_to(ROOT).as_posix() for p in (PACKAGE / "configs").rglob("*.yaml")}
    assert {"pixeldit/configs/demo.yaml", "pixeldit/configs/imagenet256/pixeldit_xl.yaml",
            "pixeldit/configs/imagenet512/pixeldit_xl.yaml"} <= configs
    assert configs - shipped == set()


def test_webdataset_is_an_extra_and_never_imported_by_the_package(wheel):
    metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    requires = [line.split(":", 1)[1].strip() for line in wheel.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    webdataset = [r for r in requires if r.startswith("webdataset")]
    assert webdataset and all("extra ==" in r for r in webdataset), webdataset
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            importers += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "webdataset"]
    assert importers == []
