"""``ore add-task --run RUN --labels LABELS --names NAMES``: labelled clusters of unknowns
become the run's next task, trained, finetuned and evaluated as every task is."""

from __future__ import annotations

import argparse

from ore.cli.common import add_overrides
from ore.engine.add_task import add_task
from ore.engine.layout import SUMMARY
from ore.engine.tasks import format_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="an `ore run-tasks` output folder")
    p.add_argument("--labels", required=True,
                   help="the labelled images: a VOC folder (Annotations/, JPEGImages/) or a "
                        "COCO JSON file, objects named by cluster (as `ore discover` exports)")
    p.add_argument("--names", required=True,
                   help="YAML file 'cluster_03: new_class' per cluster; 'ignore' (or leaving "
                        "a cluster out) keeps its objects unknown")
    p.add_argument("--no-eval", action="store_true", help="train only")
    add_overrides(p, "overrides for the new task's stages, e.g. SOLVER.MAX_ITER=200")


def run(args: argparse.Namespace) -> int:
    summary = add_task(args.run, args.labels, args.names, args.overrides,
                       evaluate=not args.no_eval)
    if not args.no_eval:
        print(format_summary(summary))
    print(f"results in {args.run}/{SUMMARY}; the run's class split: {args.run}/classes.yaml")
    return 0
