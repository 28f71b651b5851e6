"""What a user reads is self-contained and right: docs and configs cite nothing outside the package,
help texts render, and error messages name keys that exist."""

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_facing_files() -> list[str]:
    files = [os.path.join(ROOT, "README.md")]
    files += glob.glob(os.path.join(ROOT, "docs", "**", "*"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "pixeldit", "configs", "**", "*"), recursive=True)
    return sorted(f for f in files if os.path.isfile(f))


def test_docs_and_configs_cite_nothing_a_user_of_the_package_does_not_have():
    files = user_facing_files()
    assert any(f.endswith(".yaml") for f in files) and any(f.endswith("training.md") for f in files)
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if "shared/" in line or "PIXELDIT_REFERENCE" in line:
                    found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_help_texts_render_their_percent_signs(capsys):
    """argparse formats help with %: a `%%` that shows means a text was escaped where it is not formatted."""
    import argparse

    from pixeldit.cli import build_parser

    parser = build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert "sample" in verbs.choices
    for verb in verbs.choices:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([verb, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: "), verb
        assert "%%" not in text, (verb, [line for line in text.splitlines() if "%%" in line])


def test_the_dinov2_weights_error_names_the_key_that_exists(tmp_path):
    from pixeldit.errors import MissingFileError, WeightsError
    from pixeldit.models.dinov2 import read_state_dict
    from pixeldit.platform.config import Config

    assert hasattr(Config().repa, "encoder") and not hasattr(Config().repa, "encoder_weights")
    missing = str(tmp_path / "dinov2_vitb14.pth")
    with pytest.raises(MissingFileError, match=rf"^repa\.encoder={missing}: no such file"):
        read_state_dict(missing)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match=rf"^repa\.encoder={damaged}: not a torch state dict"):
        read_state_dict(str(damaged))
