"""``ore eval-detections``: evaluate a detections JSON file against a split's annotations.

Example::

    ore eval-detections --root datasets/toy --split test --task t2 --classes toy \\
        --detections dets.json --output metrics.json

The file gives each image's detections once; where the list names an image again, the
figures count that line again (the published protocol) unless ``--unique-images``.
"""

from __future__ import annotations

import argparse

from ore.data.classes import load_task_split, parse_task
from ore.data.records import as_listed, load_role_split
from ore.evaluation.detections import read_detections
from ore.evaluation.evaluator import RESULT_KEYS, OpenWorldEvaluator
from ore.evaluation.report import format_table
from ore.fileio import atomic_write_json, check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="dataset root (OWOD/VOC layout)")
    parser.add_argument("--split", required=True,
                        help="image list name under ImageSets/Main (e.g. all_task_test)")
    parser.add_argument("--task", required=True, help="current task: t1, t2, … (or 1, 2, …)")
    parser.add_argument("--classes", default="owod",
                        help="class split: owod, sowod, toy or a YAML file (default owod)")
    parser.add_argument("--detections", required=True,
                        help='JSON list of {"image_id", "category", "score", "bbox"} in the '
                             "annotation's pixel coordinates, or the same columns in a .npz "
                             "(ore.evaluation.detections.write_columnar_detections)")
    parser.add_argument("--ap", choices=("allpoint", "11point"), default="allpoint",
                        help="AP50 interpolation (default allpoint, as the reference)")
    parser.add_argument("--format", choices=("voc", "coco"), default="voc",
                        help="annotation format of the root (default voc)")
    parser.add_argument("--no-coco", action="store_true",
                        help="skip the pycocotools AP (slow on very large sets)")
    parser.add_argument("--unique-images", action="store_true",
                        help="count each image once even where the list repeats it "
                             "(default: every listed line, as the published figures)")
    parser.add_argument("--output", help="write every figure as JSON to this file")


def run(args: argparse.Namespace) -> int:
    if args.output:
        check_output_file(args.output)
    split = load_task_split(args.classes)
    task = split.check_task(parse_task(args.task))
    records = load_role_split(args.root, args.split, split, task, "test", fmt=args.format)
    evaluator = OpenWorldEvaluator(
        split=split, task=task, records=as_listed(records, args.root, args.split, args.format),
        ap=args.ap, coco=not args.no_coco, unique_images=args.unique_images,
        list_name=args.split)
    evaluator.add_detections(**read_detections(args.detections, split))
    result = evaluator.evaluate(details=True)
    print(format_table(result, title=evaluator.describe()))
    if args.output:
        path = atomic_write_json(args.output, {k: result[k] for k in RESULT_KEYS})
        print(f"wrote {path}")
    return 0
