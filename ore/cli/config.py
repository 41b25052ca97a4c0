"""``ore config show CONFIG [KEY=VALUE …]``: print the merged configuration."""

from __future__ import annotations

import argparse

from ore.cli.common import add_overrides
from ore.config import config_to_yaml, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show"], help="show: print the merged config as YAML")
    p.add_argument("config", help="YAML config file (a path, or one shipped with ore, "
                                  "e.g. toy/t1_train.yaml)")
    add_overrides(p)


def run(args: argparse.Namespace) -> int:
    print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
