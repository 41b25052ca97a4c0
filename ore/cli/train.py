"""``ore train --config CFG [--output DIR] [--resume | --overwrite] [KEY=VALUE …]``."""

from __future__ import annotations

import argparse

from ore.cli.common import add_overrides
from ore.config import load_config
from ore.engine.trainer import Trainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="YAML config (a path, or one shipped with ore, e.g. toy/t1_train.yaml)")
    p.add_argument("--output", help="run folder (default: OUTPUT_DIR from the config)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the output folder (its weights, config "
                        "and log)")
    add_overrides(p)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    final = Trainer(cfg, args.output or cfg.OUTPUT_DIR, resume=args.resume,
                    overwrite=args.overwrite).run()
    print(f"final weights: {final}")
    return 0
