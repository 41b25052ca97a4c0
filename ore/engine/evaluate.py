"""``ore evaluate``: run a detector over a split and report the open-world metrics."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the config the weights were trained with")
    p.add_argument("--weights", required=True, help="detector checkpoint (model_final.pth)")
    p.add_argument("--split", help="list to evaluate (default: DATASETS.TEST)")
    p.add_argument("--output", help="write every figure as JSON to this file")
    p.add_argument("--ap", choices=("allpoint", "11point"), default="allpoint")
    p.add_argument("--no-coco", action="store_true", help="skip the pycocotools AP")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def evaluate_model(predictor, split_name: str, *, ap: str = "allpoint", coco: bool = True,
                   batch_size: int = 4, details: bool = True) -> tuple[dict, str]:
    """Detections of ``predictor`` on ``split_name`` (test role) → (result, title line)."""
    from tqdm import tqdm

    from ore.data.dataset import DetectionDataset, make_test_loader, split_bad
    from ore.data.records import apply_role, load_split
    from ore.errors import OreError
    from ore.evaluation.evaluator import OpenWorldEvaluator

    cfg, split = predictor.cfg, predictor.split
    d = cfg.DATASETS
    task = split.check_task(cfg.OWOD.TASK)
    records = apply_role(load_split(d.ROOT, split_name, split, d.FORMAT, d.IMAGE_DIR),
                         split, task, "test")
    if not records:
        raise OreError(f"split {split_name!r} under {d.ROOT} lists no image")
    evaluator = OpenWorldEvaluator(split=split, task=task, records=records, ap=ap, coco=coco)
    evaluator.reset()
    loader = make_test_loader(DetectionDataset(records, split), batch_size,
                              cfg.DATALOADER.NUM_WORKERS)
    for batch in tqdm(loader, desc=f"evaluate {split_name}", unit="batch"):
        batch = split_bad(batch, cfg.DATALOADER.SKIP_BAD_IMAGES)
        if not batch:
            continue
        dets = predictor.predict_tensors([b[0] for b in batch])
        evaluator.process(
            [b[2] for b in batch],
            [{"boxes": x.boxes, "labels": x.labels, "scores": x.scores} for x in dets],
        )
    return evaluator.evaluate(details=details), evaluator.describe()


def run(args: argparse.Namespace) -> int:
    from ore.config import load_config
    from ore.engine.inference import Predictor
    from ore.errors import OreError
    from ore.evaluation.evaluator import RESULT_KEYS
    from ore.evaluation.report import format_table
    from ore.fileio import atomic_write_json

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
