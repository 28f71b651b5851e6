"""Arguments of `pixeldit sample` (kept light: no torch import, so a bad flag fails fast)."""

from __future__ import annotations

import argparse


def add_sample_arguments(parser: argparse.ArgumentParser):
    pass
