"""``ore detect``: draw detections (unknowns in their own colour) on images and videos and
write detections.json (and, on request, COCO results and a CSV)."""

from __future__ import annotations

import argparse

from ore.cli.common import add_batch_size, check_batch_size, split_overrides
from ore.config import load_config
from ore.data.images import collect_images, is_video_file
from ore.engine.detect import DRAW_THRESH, FORMATS, check_detect_paths, detect_images
from ore.engine.inference import Predictor
from ore.engine.layout import find_run_stage, stage_config
from ore.errors import OreError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="a run folder (ore train or ore run-tasks output): its config, "
                                 "final weights and energy fit (EBUI on when there is one)")
    p.add_argument("--stage", help="with --run: the stage folder of a run-tasks run to use "
                                   "(e.g. t2_ft; default: the last finished one)")
    p.add_argument("--config", help="the config the weights were trained with (without --run)")
    p.add_argument("--weights", help="detector checkpoint, model_final.pth (without --run)")
    p.add_argument("inputs", nargs="+", metavar="INPUT|KEY=VALUE",
                   help="image or video files, folders (searched recursively), glob patterns, "
                        "and config overrides (e.g. EBUI.ENABLED=false)")
    p.add_argument("--output", required=True,
                   help="folder for drawn images and videos + detections.json")
    p.add_argument("--format", action="append", choices=sorted(FORMATS), default=[],
                   help="also write COCO results (coco_results.json + coco_images.json) or "
                        "detections.csv; repeat for both (detections.json is always written)")
    p.add_argument("--every", type=int, default=1, help="videos: detect on every N-th frame")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections under this score (default: the config's)")
    p.add_argument("--draw-thresh", type=float, default=DRAW_THRESH,
                   help="draw only detections scoring at least this on the output images and "
                        f"videos; the results files keep every detection (default {DRAW_THRESH}"
                        ", as the serve page's slider starts)")
    add_batch_size(p)


def model_source(args: argparse.Namespace, overrides: list[str]):
    """(config, weights path) from ``--run`` [``--stage``] or ``--config`` + ``--weights``.
    A run's energy fit switches EBUI on for an ORE head unless an override says otherwise
    (overrides come last and win)."""
    if args.run is None:
        if args.stage is not None:
            raise OreError("--stage needs --run")
        missing = [f for f, v in (("--config", args.config), ("--weights", args.weights))
                   if v is None]
        if missing:
            raise OreError(f"{' and '.join(missing)} missing: give --run RUN_DIR, or both "
                           "--config and --weights")
        return load_config(args.config, overrides), args.weights
    if args.config is not None or args.weights is not None:
        raise OreError("--run takes the config and weights from the run folder: leave out "
                       "--config and --weights")
    stage = find_run_stage(args.run, args.stage)
    cfg = stage_config(stage, overrides)
    return cfg, str(stage.weights)


def run(args: argparse.Namespace) -> int:
    if args.score_thresh is not None and not 0.0 <= args.score_thresh <= 1.0:
        raise OreError(f"--score-thresh {args.score_thresh} is not in [0, 1]")
    if args.every < 1:
        raise OreError(f"--every {args.every} must be ≥ 1")
    if not 0.0 <= args.draw_thresh <= 1.0:
        raise OreError(f"--draw-thresh {args.draw_thresh} is not in [0, 1]")
    check_batch_size(args.batch_size)
    inputs, overrides = split_overrides(args.inputs)
    if not inputs:
        raise OreError("no INPUT given: name image or video files, folders or patterns")
    cfg, weights = model_source(args, overrides)
    paths = collect_images(inputs)
    check_detect_paths([*inputs, *paths], args.output, args.format)
    predictor = Predictor(cfg, weights, args.score_thresh)
    records = detect_images(predictor, paths, args.output, args.batch_size, every=args.every,
                            formats=args.format, draw_thresh=args.draw_thresh)
    n_unknown = sum(label == "unknown" for r in records for label in r["labels"])
    n_total = sum(len(r["labels"]) for r in records)
    skipped = sum("error" in r for r in records)
    n_videos = sum(is_video_file(p) for p in paths)
    n_images = sum("error" not in r and "frame" not in r for r in records)
    what = f"{n_images} images" if len(paths) > n_videos else ""
    if n_videos:
        frames = sum("frame" in r for r in records)
        what += (", " if what else "") + f"{n_videos} videos ({frames} frames)"
    ebui = " with EBUI" if cfg.EBUI.ENABLED else ""
    n_drawn = sum(s >= args.draw_thresh for r in records for s in r["scores"])
    print(f"{what}, {n_total} detections ({n_unknown} unknown){ebui} → {args.output}"
          f" ({n_drawn} scoring ≥ {args.draw_thresh:g} drawn)"
          + (f"; {skipped} unreadable {'inputs' if n_videos else 'images'} skipped"
             if skipped else ""))
    return 0
