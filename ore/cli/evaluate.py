"""``ore evaluate``: run a detector over a split and report the open-world metrics."""

from __future__ import annotations

import argparse

from ore.config import load_config
from ore.engine.evaluate import evaluate_model
from ore.engine.inference import Predictor
from ore.errors import OreError
from ore.evaluation.evaluator import RESULT_KEYS
from ore.evaluation.report import format_table
from ore.fileio import atomic_write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the config the weights were trained with")
    p.add_argument("--weights", required=True, help="detector checkpoint (model_final.pth)")
    p.add_argument("--split", help="list to evaluate (default: DATASETS.TEST)")
    p.add_argument("--output", help="write every figure as JSON to this file")
    p.add_argument("--ap", choices=("allpoint", "11point"), default="allpoint")
    p.add_argument("--no-coco", action="store_true", help="skip the pycocotools AP")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise OreError(f"--batch-size {args.batch_size} must be ≥ 1")
    cfg = load_config(args.config, args.overrides)
    predictor = Predictor(cfg, args.weights)
    result, title = evaluate_model(predictor, args.split or cfg.DATASETS.TEST, ap=args.ap,
                                   coco=not args.no_coco, batch_size=args.batch_size)
    print(format_table(result, title=title))
    if args.output:
        print(f"wrote {atomic_write_json(args.output, {k: result[k] for k in RESULT_KEYS})}")
    return 0
