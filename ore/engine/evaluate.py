"""The evaluation loop: a predictor over a split, into the open-world evaluator."""

from __future__ import annotations

from tqdm import tqdm

from ore.data.dataset import (
    DetectionDataset,
    make_test_loader,
    note_size_mismatches,
    split_bad,
)
from ore.data.records import as_listed, load_dataset_split
from ore.engine.inference import Predictor
from ore.errors import OreError
from ore.evaluation.evaluator import OpenWorldEvaluator


def evaluate_model(predictor: Predictor, split_name: str, *, ap: str = "allpoint",
                   coco: bool = True, batch_size: int = 4, details: bool = True,
                   unique_images: bool | None = None) -> tuple[dict, str]:
    """Detections of ``predictor`` on ``split_name`` (test role) → (result, title line).

    The model runs once per image. A list line that repeats an image counts again in the
    figures (the published protocol) unless ``unique_images`` (None:
    ``DATASETS.TEST_UNIQUE_IMAGES``)."""
    cfg, split = predictor.cfg, predictor.split
    d = cfg.DATASETS
    if unique_images is None:
        unique_images = bool(getattr(d, "TEST_UNIQUE_IMAGES", False))
    task = split.check_task(cfg.OWOD.TASK)
    records = load_dataset_split(d, split_name, split, task, "test")  # each image once
    if not records:
        raise OreError(f"split {split_name!r} under {d.ROOT} lists no image")
    evaluator = OpenWorldEvaluator(
        split=split, task=task, records=as_listed(records, d.ROOT, split_name, d.FORMAT),
        ap=ap, coco=coco, unique_images=unique_images, list_name=split_name)
    evaluator.reset()
    dataset = DetectionDataset(records, split, max_pixels=cfg.INPUT.MAX_PIXELS)
    loader = make_test_loader(dataset, batch_size, cfg.DATALOADER.NUM_WORKERS)
    counts: dict = {}
    mismatched: set[str] = set()
    for batch in tqdm(loader, desc=f"evaluate {split_name}", unit="batch"):
        batch = split_bad(batch, cfg.DATALOADER.SKIP_BAD_IMAGES)
        note_size_mismatches(batch, counts, mismatched)
        if not batch:
            continue
        dets = predictor.predict_tensors([b[0] for b in batch])
        evaluator.process(
            [b[2] for b in batch],
            [{"boxes": x.boxes, "labels": x.labels, "scores": x.scores} for x in dets],
        )
    return evaluator.evaluate(details=details), evaluator.describe()
