"""Detections files: a JSON list of
``{"image_id": str, "category": str, "score": number, "bbox": [xmin, ymin, xmax, ymax]}``
in the annotation's own pixel coordinates (VOC: 1-based, inclusive; no shift is applied),
or the same columns in a ``.npz`` file (:func:`write_columnar_detections`), which reads
in a fraction of the time and memory for large files.

Class names are canonicalised like annotation names (COCO spellings map to VOC ones);
``unknown`` is the unknown class. A malformed entry is an :class:`OreError` naming the
entry's index.
"""

from __future__ import annotations

import contextlib
import gc
import math
import zipfile
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np

from ore.data.classes import UNKNOWN, TaskSplit, canonical_name
from ore.errors import OreError
from ore.fileio import atomic_write, read_json

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
        box_arr = np.fromiter(chain.from_iterable(bboxes), np.float64,
                              4 * len(bboxes)).reshape(-1, 4)
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


# The arrays of a columnar detections file: D detections, I image ids, C category names.
COLUMNS = {
    "image_ids": "str [I]",
    "images": "int [D], index into image_ids",
    "categories": "str [C], class names as in the JSON form",
    "labels": "int [D], index into categories",
    "scores": "float [D]",
    "boxes": "float [D, 4] xmin, ymin, xmax, ymax",
}


@contextlib.contextmanager
def _collector_paused():
    """Decoded JSON is a tree without cycles: the cyclic collector, which would otherwise
    sweep every container made so far again and again, has nothing to find in it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_detections(path: str | Path, split: TaskSplit) -> dict:
    """Read and validate a detections file: JSON (see :func:`parse_detections`), or
    columnar when its name ends with ``.npz`` (see :func:`read_columnar_detections`)."""
    path = Path(path)
    if not path.is_file():
        raise OreError(f"detections file not found: {path}")
    if path.suffix.lower() == ".npz":
        return read_columnar_detections(path, split)
    with _collector_paused():
        entries = read_json(path)
        return parse_detections(entries, split, where=str(path))


def write_columnar_detections(path: str | Path, image_ids: Sequence[str],
                              categories: Sequence[str], scores, boxes) -> Path:
    """Write D detections as a columnar ``.npz`` (arrays :data:`COLUMNS`); written to a
    temporary name, then renamed.

    Args:
        image_ids: D image ids.
        categories: D class names (``unknown`` for the unknown class).
        scores: float [D].
        boxes: float [D, 4] in the annotation's pixel coordinates, as in the JSON form.
    """
    id_table, images = np.unique(np.asarray(image_ids, dtype=np.str_), return_inverse=True)
    name_table, labels = np.unique(np.asarray(categories, dtype=np.str_), return_inverse=True)
    arrays = {
        "image_ids": id_table, "images": images.reshape(-1).astype(np.int64),
        "categories": name_table, "labels": labels.reshape(-1).astype(np.int64),
        "scores": np.asarray(scores, np.float64).reshape(-1),
        "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
    }
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def read_columnar_detections(path: str | Path, split: TaskSplit) -> dict:
    """Read and validate a columnar detections file (arrays :data:`COLUMNS`; no pickled
    objects). The checks are the JSON form's, and a bad detection is named by its index.

    Returns:
        the dict of :func:`parse_detections`.
    """
    where = str(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise OreError(f"{where}: not a columnar detections .npz file (it holds one "
                           "array, not the named arrays of one)")
        with z:
            missing = [k for k in COLUMNS if k not in z.files]
            if missing:
                raise OreError(f"{where}: no array {missing[0]!r}; a columnar detections file "
                               f"holds {', '.join(f'{k} ({v})' for k, v in COLUMNS.items())}")
            a = {k: z[k] for k in COLUMNS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OreError(f"{where}: not a columnar detections .npz file ({exc})") from None
    for key, kind, ndim in (("image_ids", "U", 1), ("categories", "U", 1), ("images", "iu", 1),
                            ("labels", "iu", 1), ("scores", "iuf", 1), ("boxes", "iuf", 2)):
        if a[key].dtype.kind not in kind or a[key].ndim != ndim:
            raise OreError(f"{where}: array {key!r} is {a[key].dtype} of shape "
                           f"{a[key].shape}; expected {COLUMNS[key]}")
    d = len(a["images"])
    if a["boxes"].shape[1:] != (4,) or not len(a["labels"]) == len(a["scores"]) == \
            len(a["boxes"]) == d:
        raise OreError(f"{where}: images, labels, scores and boxes must have D entries (boxes "
                       f"[D, 4]); got {d}, {len(a['labels'])}, {len(a['scores'])} and "
                       f"{list(a['boxes'].shape)}")
    for key, table in (("images", "image_ids"), ("labels", "categories")):
        bad = (a[key] < 0) | (a[key] >= len(a[table]))
        if bad.any():
            i = int(np.argmax(bad))
            raise OreError(f"{where}: entry #{i}: {key} is {a[key][i]}, not an index into "
                           f"{table} (0..{len(a[table]) - 1})")
    image_ids = a["image_ids"].tolist()
    empty = [j for j, image_id in enumerate(image_ids) if not image_id]
    if empty and (a["images"] == empty[0]).any():
        i = int(np.argmax(a["images"] == empty[0]))
        raise OreError(f"{where}: entry #{i}: image_id must be a non-empty string, got ''")
    label_of = np.zeros(len(a["categories"]), np.int64)
    for j, category in enumerate(a["categories"].tolist()):
        name = canonical_name(category)
        if name != UNKNOWN and name not in split.classes:
            used = a["labels"] == j
            if used.any():
                raise OreError(f"{where}: entry #{int(np.argmax(used))}: category {category!r} "
                               f"is in no task of split {split.name} (nor {UNKNOWN!r})")
            continue
        label_of[j] = split.label(name)
    scores = a["scores"].astype(np.float64)
    boxes = a["boxes"].astype(np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        i = int(np.argmax(bad))
        raise OreError(f"{where}: entry #{i}: score must be a finite number, got "
                       f"{scores[i].item()!r}")
    bad = ~np.isfinite(boxes).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise OreError(f"{where}: entry #{i}: bbox must be 4 finite numbers "
                       f"[xmin, ymin, xmax, ymax], got {boxes[i].tolist()}")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(np.argmax(bad))
        raise OreError(f"{where}: entry #{i}: bbox {boxes[i].tolist()} has xmax < xmin or "
                       "ymax < ymin")
    return {
        "image_ids": [image_ids[i] for i in a["images"].tolist()],
        "labels": label_of[a["labels"]],
        "scores": scores,
        "boxes": boxes,
    }
