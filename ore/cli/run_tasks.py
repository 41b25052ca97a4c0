"""``ore run-tasks --configs DIR --output RUN``: every task in turn, resumable."""

from __future__ import annotations

import argparse

from ore.cli.common import add_overrides
from ore.engine.layout import SUMMARY
from ore.engine.tasks import find_config_dir, format_summary, run_tasks
from ore.evaluation.report import protocol_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", required=True,
                   help="folder with t1_train.yaml, t2_train.yaml, t2_ft.yaml, … (or one "
                        "shipped with ore: toy, owod, sowod, owod_reference, sowod_reference)")
    p.add_argument("--output", required=True, help="run folder (one sub-folder per step)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--schedule-scale", type=float, default=1.0,
                   help="multiply every iteration count (e.g. 0.2 for a quick look)")
    p.add_argument("--unique-images", action="store_true",
                   help="evaluate each test image once even where the list repeats it "
                        "(DATASETS.TEST_UNIQUE_IMAGES=true; default: every listed line, as "
                        "the published figures)")
    add_overrides(p, "overrides for every task, e.g. MODEL.ROI_HEADS.NAME=standard")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.unique_images:
        overrides.append("DATASETS.TEST_UNIQUE_IMAGES=true")
    summary = run_tasks(find_config_dir(args.configs), args.output, overrides,
                        evaluate=not args.no_eval, schedule_scale=args.schedule_scale)
    if not args.no_eval:
        print(format_summary(summary))
        print(_protocols(summary))
    print(f"results in {args.output}/{SUMMARY}")
    return 0


def _protocols(summary: dict) -> str:
    """The protocol line of the summary's evaluations (one per distinct protocol)."""
    lines = {protocol_line(r) for stages in summary.values() for r in stages.values()
             if isinstance(r, dict) and "per_class_ap" in r}
    return "\n".join(sorted(lines)) or protocol_line({})
