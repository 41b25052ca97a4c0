"""``ore serve``: a local web page and JSON endpoint over a trained detector."""

from __future__ import annotations

import argparse

import uvicorn

from ore.cli.common import add_overrides
from ore.cli.detect import model_source
from ore.engine.inference import Predictor
from ore.engine.serve import MAX_UPLOAD_BYTES, build_app
from ore.errors import OreError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="a run folder (ore train or ore run-tasks output): its config, "
                                 "final weights and energy fit (EBUI on when there is one)")
    p.add_argument("--stage", help="with --run: the stage folder to use (e.g. t2_ft)")
    p.add_argument("--config", help="the config the weights were trained with (without --run)")
    p.add_argument("--weights", help="detector checkpoint, model_final.pth (without --run)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: local)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                   help="refuse larger uploads (413)")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections under this score (default: the config's)")
    add_overrides(p)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise OreError(f"--port {args.port} is not in 1..65535")
    if not args.max_upload_mb > 0:
        raise OreError(f"--max-upload-mb {args.max_upload_mb} must be > 0")
    if args.score_thresh is not None and not 0.0 <= args.score_thresh <= 1.0:
        raise OreError(f"--score-thresh {args.score_thresh} is not in [0, 1]")
    cfg, weights = model_source(args, args.overrides)
    predictor = Predictor(cfg, weights, args.score_thresh)
    app = build_app(predictor, max_upload_bytes=int(args.max_upload_mb * 2**20))
    print(f"ORE serving on http://{args.host}:{args.port}/ (JSON: POST /api/detect); "
          "Ctrl-C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
