"""``ore evaluate``: run a detector over a split and report the open-world metrics."""

from __future__ import annotations

import argparse

from ore.cli.common import add_batch_size, add_model_arguments, add_overrides, check_batch_size
from ore.config import load_config
from ore.engine.evaluate import evaluate_model
from ore.engine.inference import Predictor
from ore.evaluation.evaluator import RESULT_KEYS
from ore.evaluation.report import format_table
from ore.fileio import atomic_write_json, check_output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--split", help="list to evaluate (default: DATASETS.TEST)")
    p.add_argument("--output", help="write every figure as JSON to this file")
    p.add_argument("--ap", choices=("allpoint", "11point"), default="allpoint")
    p.add_argument("--no-coco", action="store_true", help="skip the pycocotools AP")
    p.add_argument("--unique-images", action="store_true",
                   help="count each image once even where the list repeats it (default: "
                        "every listed line, as the published figures; config key "
                        "DATASETS.TEST_UNIQUE_IMAGES)")
    add_batch_size(p)
    add_overrides(p)


def run(args: argparse.Namespace) -> int:
    check_batch_size(args.batch_size)
    if args.output:
        check_output_file(args.output)
    cfg = load_config(args.config, args.overrides)
    predictor = Predictor(cfg, args.weights)
    result, title = evaluate_model(predictor, args.split or cfg.DATASETS.TEST, ap=args.ap,
                                   coco=not args.no_coco, batch_size=args.batch_size,
                                   unique_images=args.unique_images or None)
    print(format_table(result, title=title))
    if args.output:
        print(f"wrote {atomic_write_json(args.output, {k: result[k] for k in RESULT_KEYS})}")
    return 0
