"""Detections files: a JSON list of
``{"image_id": str, "category": str, "score": number, "bbox": [xmin, ymin, xmax, ymax]}``
in the annotation's own pixel coordinates (VOC: 1-based, inclusive; no shift is applied).

Class names are canonicalised like annotation names (COCO spellings map to VOC ones);
``unknown`` is the unknown class. A malformed entry is an :class:`OreError` naming the
entry's index.
"""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path

import numpy as np

from ore.data.classes import UNKNOWN, TaskSplit, canonical_name
from ore.errors import OreError
from ore.fileio import read_json

_KEYS = ("image_id", "category", "score", "bbox")


def _is_number(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def parse_detections(entries, split: TaskSplit, where: str = "detections") -> dict:
    """Validate decoded JSON entries and turn them into arrays.

    Returns:
        ``{"image_ids": list[str] [D], "labels": int64 [D], "scores": float64 [D],
        "boxes": float64 [D, 4]}``, ready for ``OpenWorldEvaluator.add_detections``.
    """
    if not isinstance(entries, list):
        raise OreError(f"{where}: expected a JSON list of detections, got "
                       f"{type(entries).__name__}")
    parsed = _parse_well_formed(entries, split)
    if parsed is not None:
        return parsed
    return _parse_checking_each(entries, split, where)


_NUMBER_TYPES = {int, float}


def _parse_well_formed(entries: list, split: TaskSplit) -> dict | None:
    """Column-wise checks with C-level loops; None if anything is off (the per-entry
    parser then finds the first bad entry and names it)."""
    try:
        if set(map(type, entries)) - {dict}:
            return None
        image_ids = [e["image_id"] for e in entries]
        categories = [e["category"] for e in entries]
        scores = [e["score"] for e in entries]
        bboxes = [e["bbox"] for e in entries]
        if (set(map(type, image_ids)) - {str} or "" in image_ids
                or set(map(type, categories)) - {str}
                or set(map(type, scores)) - _NUMBER_TYPES
                or set(map(type, bboxes)) - {list} or set(map(len, bboxes)) - {4}
                or set(map(type, chain.from_iterable(bboxes))) - _NUMBER_TYPES):
            return None
        labels_of = {}
        for category in set(categories):
            name = canonical_name(category)
            if name != UNKNOWN and name not in split.classes:
                return None
            labels_of[category] = split.label(name)
        score_arr = np.asarray(scores, np.float64)
        box_arr = np.asarray(bboxes, np.float64).reshape(-1, 4)
    except (KeyError, OverflowError):
        return None
    if (not np.isfinite(score_arr).all() or not np.isfinite(box_arr).all()
            or (box_arr[:, 2] < box_arr[:, 0]).any() or (box_arr[:, 3] < box_arr[:, 1]).any()):
        return None
    return {
        "image_ids": image_ids,
        "labels": np.fromiter(map(labels_of.__getitem__, categories), np.int64,
                              len(categories)),
        "scores": score_arr,
        "boxes": box_arr,
    }


def _parse_checking_each(entries: list, split: TaskSplit, where: str) -> dict:
    labels_of: dict[str, int] = {}
    image_ids, labels, scores, boxes = [], [], [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(k not in e for k in _KEYS):
            raise OreError(f"{where}: entry #{i} must be an object with keys "
                           f"{', '.join(_KEYS)}; got {str(e)[:80]}")
        image_id, category, score, bbox = e["image_id"], e["category"], e["score"], e["bbox"]
        if not isinstance(image_id, str) or not image_id:
            raise OreError(f"{where}: entry #{i}: image_id must be a non-empty string, got "
                           f"{image_id!r}")
        if not isinstance(category, str):
            raise OreError(f"{where}: entry #{i}: category must be a class name, got "
                           f"{category!r}")
        label = labels_of.get(category)
        if label is None:
            name = canonical_name(category)
            if name != UNKNOWN and name not in split.classes:
                raise OreError(f"{where}: entry #{i}: category {category!r} is in no task of "
                               f"split {split.name} (nor {UNKNOWN!r})")
            label = labels_of[category] = split.label(name)
        if not _is_number(score):
            raise OreError(f"{where}: entry #{i}: score must be a finite number, got {score!r}")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(_is_number(v) for v in bbox)):
            raise OreError(f"{where}: entry #{i}: bbox must be 4 finite numbers "
                           f"[xmin, ymin, xmax, ymax], got {str(bbox)[:80]}")
        if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
            raise OreError(f"{where}: entry #{i}: bbox {bbox} has xmax < xmin or ymax < ymin")
        image_ids.append(image_id)
        labels.append(label)
        scores.append(score)
        boxes.append(bbox)
    return {
        "image_ids": image_ids,
        "labels": np.asarray(labels, np.int64),
        "scores": np.asarray(scores, np.float64),
        "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
    }


def read_detections(path: str | Path, split: TaskSplit) -> dict:
    """Read and validate a detections JSON file (see :func:`parse_detections`)."""
    path = Path(path)
    if not path.is_file():
        raise OreError(f"detections file not found: {path}")
    entries = read_json(path)
    return parse_detections(entries, split, where=str(path))
