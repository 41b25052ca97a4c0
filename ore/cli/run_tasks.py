"""``ore run-tasks --configs DIR --output RUN``: every task in turn, resumable."""

from __future__ import annotations

import argparse

from ore.cli.common import add_overrides
from ore.engine.layout import SUMMARY
from ore.engine.tasks import find_config_dir, format_summary, run_tasks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", required=True,
                   help="folder with t1_train.yaml, t2_train.yaml, t2_ft.yaml, … (or one "
                        "shipped with ore: toy, owod, sowod)")
    p.add_argument("--output", required=True, help="run folder (one sub-folder per step)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--schedule-scale", type=float, default=1.0,
                   help="multiply every iteration count (e.g. 0.2 for a quick look)")
    add_overrides(p, "overrides for every task, e.g. MODEL.ROI_HEADS.NAME=standard")


def run(args: argparse.Namespace) -> int:
    summary = run_tasks(find_config_dir(args.configs), args.output, args.overrides,
                        evaluate=not args.no_eval, schedule_scale=args.schedule_scale)
    if not args.no_eval:
        print(format_summary(summary))
    print(f"results in {args.output}/{SUMMARY}")
    return 0
