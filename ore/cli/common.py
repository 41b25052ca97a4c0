"""Flags several commands share, declared once."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ore.errors import OreError

# A config override: a dotted key, "=", a value (SOLVER.BASE_LR=0.02).
_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)*=")


def add_model_arguments(p: argparse.ArgumentParser,
                        weights_help: str = "detector checkpoint (model_final.pth)") -> None:
    """``--config`` and ``--weights`` of a trained detector."""
    p.add_argument("--config", required=True, help="the config the weights were trained with")
    p.add_argument("--weights", required=True, help=weights_help)


def add_batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")


def add_overrides(p: argparse.ArgumentParser, help_text: str = "config overrides") -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help_text)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise OreError(f"--batch-size {batch_size} must be ≥ 1")


def split_overrides(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments as (the others, the ``KEY=VALUE`` overrides), for a command
    whose positionals mix both (``ore detect``); a token naming an existing path is never
    an override."""
    others, overrides = [], []
    for t in tokens:
        (overrides if _OVERRIDE.match(t) and not Path(t).exists() else others).append(t)
    return others, overrides
