"""``ore build-exemplars``: write the balanced exemplar list of a finetune config."""

from __future__ import annotations

import argparse
from pathlib import Path

from ore.cli.common import add_overrides
from ore.config import load_config
from ore.data.exemplars import build_exemplar_list
from ore.errors import OreError
from ore.fileio import atomic_write_text, check_output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the finetune config (task, classes, root)")
    p.add_argument("--per-class", type=int, default=None,
                   help="images per seen class (default: EXEMPLARS.PER_CLASS)")
    p.add_argument("--output", required=True, help="ImageSets-style list file to write")
    add_overrides(p)


def run(args: argparse.Namespace) -> int:
    if args.per_class is not None and args.per_class < 1:
        raise OreError(f"--per-class {args.per_class} must be ≥ 1")
    check_output_file(args.output)
    ids = build_exemplar_list(load_config(args.config, args.overrides), args.per_class)
    out = atomic_write_text(Path(args.output), "".join(i + "\n" for i in ids))
    print(f"{len(ids)} exemplar images → {out}")
    return 0
