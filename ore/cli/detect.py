"""``ore detect``: draw detections (unknowns in their own colour) and write detections.json."""

from __future__ import annotations

import argparse

from ore.cli.common import (
    add_batch_size,
    add_model_arguments,
    check_batch_size,
    split_overrides,
)
from ore.config import load_config
from ore.data.images import collect_images
from ore.engine.detect import check_detect_paths, detect_images
from ore.engine.inference import Predictor
from ore.errors import OreError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT|KEY=VALUE",
                   help="image files or folders, and config overrides "
                        "(e.g. EBUI.ENABLED=true EBUI.FIT_FILE=energy_fit.json)")
    p.add_argument("--output", required=True, help="folder for drawn images + detections.json")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections under this score (default: the config's)")
    add_batch_size(p)


def run(args: argparse.Namespace) -> int:
    if args.score_thresh is not None and not 0.0 <= args.score_thresh <= 1.0:
        raise OreError(f"--score-thresh {args.score_thresh} is not in [0, 1]")
    check_batch_size(args.batch_size)
    inputs, overrides = split_overrides(args.inputs)
    if not inputs:
        raise OreError("no INPUT given: name image files or folders")
    cfg = load_config(args.config, overrides)
    check_detect_paths(inputs, args.output)
    paths = collect_images(inputs)
    predictor = Predictor(cfg, args.weights, args.score_thresh)
    records = detect_images(predictor, paths, args.output, args.batch_size)
    n_unknown = sum(label == "unknown" for r in records for label in r["labels"])
    n_total = sum(len(r["labels"]) for r in records)
    skipped = sum("error" in r for r in records)
    print(f"{len(records) - skipped} images, {n_total} detections ({n_unknown} unknown) → "
          f"{args.output}" + (f"; {skipped} unreadable images skipped" if skipped else ""))
    return 0
