"""Arguments of `pixeldit repa-cache` (kept light: no torch import)."""

from __future__ import annotations

import argparse


def add_repa_cache_arguments(parser: argparse.ArgumentParser):
    pass
