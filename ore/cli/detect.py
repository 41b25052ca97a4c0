"""``ore detect``: draw detections (unknowns in their own colour) and write detections.json."""

from __future__ import annotations

import argparse

from ore.cli.common import add_batch_size, add_model_arguments, check_batch_size
from ore.config import load_config
from ore.data.images import collect_images
from ore.engine.detect import detect_images
from ore.engine.inference import Predictor
from ore.errors import OreError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--output", required=True, help="folder for drawn images + detections.json")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections under this score (default: the config's)")
    add_batch_size(p)


def run(args: argparse.Namespace) -> int:
    if args.score_thresh is not None and not 0.0 <= args.score_thresh <= 1.0:
        raise OreError(f"--score-thresh {args.score_thresh} is not in [0, 1]")
    check_batch_size(args.batch_size)
    paths = collect_images(args.inputs)
    predictor = Predictor(load_config(args.config), args.weights, args.score_thresh)
    records = detect_images(predictor, paths, args.output, args.batch_size)
    n_unknown = sum(label == "unknown" for r in records for label in r["labels"])
    n_total = sum(len(r["labels"]) for r in records)
    print(f"{len(records)} images, {n_total} detections ({n_unknown} unknown) → {args.output}")
    return 0
