"""``ore dataset-stats``: images and objects per class of a split, after role filtering."""

from __future__ import annotations

import argparse
import json

from ore.data.classes import load_task_split, parse_task
from ore.data.records import apply_role, dataset_stats, load_split
from ore.errors import OreError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="dataset root (VOC/OWOD layout)")
    p.add_argument("--split", required=True, help="list name, e.g. t1_train or all_task_test")
    p.add_argument("--task", help="task (t1..tN) whose role filtering applies")
    p.add_argument("--role", choices=["train", "finetune", "test"],
                   help="split role (needs --task); without it objects are counted as annotated")
    p.add_argument("--classes", default="owod", help="owod | sowod | toy | FILE.yaml")
    p.add_argument("--format", default="voc", choices=["voc", "coco"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    split = load_task_split(args.classes)
    records = load_split(args.root, args.split, split, args.format)
    if (args.task is None) != (args.role is None):
        raise OreError("--task and --role go together (e.g. --task t2 --role train)")
    if args.role:
        records = apply_role(records, split, parse_task(args.task), args.role)
    stats = dataset_stats(records)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"images: {stats['images']}")
        width = max((len(k) for k in stats["objects"]), default=5)
        for name, count in sorted(stats["objects"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:<{width}}  {count}")
    return 0
