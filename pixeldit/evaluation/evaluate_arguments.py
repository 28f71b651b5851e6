"""Arguments of `pixeldit evaluate` (kept light: no torch import, so a bad flag fails fast)."""

from __future__ import annotations

import argparse


def add_evaluate_arguments(parser: argparse.ArgumentParser):
    pass
