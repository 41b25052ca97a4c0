"""Detection on a user's images and videos: drawn copies (unknowns in their own colour),
``detections.json`` and, on request, a COCO results file and a CSV.

The output folder is kept apart from the inputs (:func:`check_detect_paths`, before any
work), and a file in it that detect did not write is never replaced: a drawn copy whose
name is taken gets a suffix, and a results file (``coco_results.json``, ``detections.csv``)
whose name is taken is an error. An image that cannot be read (or is over
``INPUT.MAX_PIXELS``) is skipped with a warning and listed in ``detections.json`` with
its ``error``. A video gives a drawn video (every ``every``-th frame) and one record per
frame it ran on, with the frame's index under ``frame``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ore.data.classes import UNKNOWN
from ore.data.images import UnreadableImage, decode_image, is_video_file
from ore.engine.inference import ImageDetections, Predictor
from ore.errors import OreError
from ore.fileio import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    read_json,
)
from ore.vis.draw import draw_detections

log = logging.getLogger(__name__)

DETECTIONS_FILE = "detections.json"
COCO_RESULTS = "coco_results.json"  # [{image_id, category_id, bbox: [x, y, w, h], score}]
COCO_IMAGES = "coco_images.json"  # {images, categories (unknown its own), annotations: []}
CSV_FILE = "detections.csv"
FORMATS = {"json": (DETECTIONS_FILE,), "coco": (COCO_RESULTS, COCO_IMAGES), "csv": (CSV_FILE,)}
RESULT_FILES = tuple(name for names in FORMATS.values() for name in names)
# Drawn videos keep these containers (and their codec); any other video is drawn as .mp4.
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
CSV_COLUMNS = ("image", "frame", "drawn", "x1", "y1", "x2", "y2", "label", "unknown", "score",
               "energy", "known_logpdf", "unknown_logpdf")
# Drawn output shows detections from this score up (the results files keep them all).
DRAW_THRESH = 0.3


def _files_of_others(out: Path) -> set[str]:
    """Names of the files in ``out`` that an earlier detect did not write there."""
    if not out.is_dir():
        return set()
    ours: set[str] = {DETECTIONS_FILE}
    previous = out / DETECTIONS_FILE
    if previous.is_file():
        try:
            records = read_json(previous)
        except OreError:
            records = None
        if not (isinstance(records, list)
                and all(isinstance(r, dict) and "image" in r for r in records)):
            raise OreError(f"--output: {previous} was not written by ore detect; it is never "
                           "replaced: choose another --output")
        ours |= {r["drawn"] for r in records if isinstance(r.get("drawn"), str)}
        ours |= {name for name in RESULT_FILES if _written_by_detect(out / name)}
    return {p.name for p in out.iterdir()} - ours


def _written_by_detect(path: Path) -> bool:
    """Whether the results file ``path`` (beside an earlier detect's detections.json) has
    the form detect gives it; a file of that name in another form is someone else's."""
    if path.name == DETECTIONS_FILE or not path.is_file():
        return True
    if path.name == CSV_FILE:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\n") == ",".join(CSV_COLUMNS)
    try:
        data = read_json(path)
    except OreError:
        return False
    if path.name == COCO_RESULTS:
        return isinstance(data, list) and all(
            isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys()
            for r in data)
    return isinstance(data, dict) and data.keys() == {"images", "categories", "annotations"}


def check_formats(formats) -> tuple[str, ...]:
    """``formats`` as a tuple with ``json`` first (detections.json is always written)."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise OreError(f"--format {bad[0]!r}: expected one of {', '.join(FORMATS)}")
    return ("json", *sorted(set(formats) - {"json"}))


def check_detect_paths(inputs: list[str | Path], output: str | Path,
                       formats=("json",)) -> Path:
    """Before any work: ``output`` is a folder that can be written, it neither is,
    contains nor lies inside an input (drawn copies would replace the photos), and no
    results file of ``formats`` there was written by anyone else."""
    out = check_output_dir(output)
    real_out = Path(os.path.realpath(out))
    for raw in inputs:
        real_in = Path(os.path.realpath(raw))
        if real_out.is_relative_to(real_in) or real_in.is_relative_to(real_out):
            raise OreError(f"--output {output} overlaps the input {raw} (it is, contains or "
                           "lies inside it): choose an output folder apart from the images")
    others = _files_of_others(out)
    for fmt in check_formats(formats):
        for name in FORMATS[fmt]:
            if name in others:
                raise OreError(f"--output: {out / name} was not written by ore detect; it is "
                               "never replaced: choose another --output")
    return out


def _failed(path: Path, reason: str) -> dict:
    log.warning("skipping %s: %s", path, reason)
    return {"image": str(path), "drawn": None, "boxes": [], "labels": [], "scores": [],
            "error": reason}


def _rounded(values: np.ndarray, digits: int) -> list:
    """Rounded floats for JSON; a value that is not finite (a log density of 0) → None."""
    v = np.round(values.astype(np.float64), digits)
    return np.where(np.isfinite(v), v, None).tolist()


def detection_record(source: str, drawn: str | None, det: ImageDetections, height: int,
                     width: int, frame: int | None = None) -> dict:
    """The ``detections.json`` record of one image (or one frame of a video)."""
    record = {"image": source, "drawn": drawn, "height": int(height), "width": int(width),
              "boxes": np.round(det.boxes.astype(np.float64), 2).tolist(),
              "labels": list(det.names), "scores": _rounded(det.scores, 4)}
    if frame is not None:
        record = {"image": source, "frame": int(frame), **record}
    if det.energies is not None:
        record["energies"] = _rounded(det.energies, 4)
        record["known_logpdf"] = _rounded(det.known_logpdf, 4)
        record["unknown_logpdf"] = _rounded(det.unknown_logpdf, 4)
    return record


def _draw(image: np.ndarray, det: ImageDetections, min_score: float) -> np.ndarray:
    """``image`` with the detections scoring at least ``min_score`` drawn on it."""
    keep = np.flatnonzero(det.scores >= min_score)
    energies = None if det.energies is None else det.energies[keep]
    return draw_detections(image, det.boxes[keep], [det.names[i] for i in keep],
                           det.scores[keep], energies=energies)


class _Names:
    """Output file names not yet taken in the output folder."""

    def __init__(self, out: Path):
        self.used = _files_of_others(out) | set(RESULT_FILES)

    def take(self, stem: str, suffix: str) -> str:
        name, k = stem + suffix, 1
        while name in self.used:  # same file name from two folders, or not ours
            name, k = f"{stem}_{k}{suffix}", k + 1
        self.used.add(name)
        return name


def _detect_batch(predictor: Predictor, chunk: list[Path], out: Path, names: _Names,
                  max_pixels: int, draw_thresh: float) -> list[dict]:
    images: list = []  # per path: the image, or the record of its failure
    for p in chunk:
        try:
            images.append(decode_image(p, max_pixels))
        except UnreadableImage as exc:
            images.append(_failed(p, exc.reason))
    readable = [img for img in images if not isinstance(img, dict)]
    dets = iter(predictor.predict(readable) if readable else [])
    records = []
    for p, img in zip(chunk, images):
        if isinstance(img, dict):
            records.append(img)
            continue
        det = next(dets)
        name = names.take(p.stem, ".jpg")
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(_draw(img, det, draw_thresh),
                                                        cv2.COLOR_RGB2BGR))
        atomic_write(out / name, lambda f, data=jpg: f.write(data.tobytes()))
        records.append(detection_record(str(p), name, det, *img.shape[:2]))
    return records


def _detect_video(predictor: Predictor, path: Path, out: Path, names: _Names, every: int,
                  batch_size: int, max_pixels: int, draw_thresh: float) -> list[dict]:
    """Every ``every``-th frame of ``path``: its record, and a drawn video of those frames
    (written under a temporary name, renamed once whole)."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        return [_failed(path, "cannot be opened as a video (OpenCV)")]
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if max_pixels and width * height > max_pixels:
        cap.release()
        return [_failed(path, f"{width}×{height} frames are over INPUT.MAX_PIXELS={max_pixels}")]
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    suffix = path.suffix.lower() if path.suffix.lower() in VIDEO_CODECS else ".mp4"
    name = names.take(path.stem, suffix)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.{os.getpid()}.tmp{suffix}"
    writer, records, pending = None, [], []  # pending: (frame index, RGB frame)

    def flush():
        nonlocal writer
        for (index, rgb), det in zip(pending, predictor.predict([f for _, f in pending])):
            if writer is None:
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*VIDEO_CODECS[suffix]),
                                         max(fps / every, 1.0), (rgb.shape[1], rgb.shape[0]))
                if not writer.isOpened():
                    raise OreError(f"cannot write the video {out / name} (OpenCV)")
            writer.write(cv2.cvtColor(_draw(rgb, det, draw_thresh), cv2.COLOR_RGB2BGR))
            records.append(detection_record(str(path), name, det, *rgb.shape[:2], frame=index))
        pending.clear()

    try:
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if index % every == 0:
                pending.append((index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                if len(pending) == batch_size:
                    flush()
            index += 1
        if pending:
            flush()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if not records:
        tmp.unlink(missing_ok=True)
        return [_failed(path, "no frame could be read (OpenCV)")]
    os.replace(tmp, out / name)
    return records


def detect_images(predictor: Predictor, paths: list[Path], output: str | Path,
                  batch_size: int = 4, *, every: int = 1, formats=("json",),
                  draw_thresh: float = 0.0) -> list[dict]:
    """Run ``predictor`` on ``paths`` (images and videos); write ``<output>/<stem>.jpg``
    (drawn) per image, a drawn ``<output>/<stem>.mp4`` (or ``.avi``) per video, and
    ``<output>/detections.json`` with the results files of ``formats``. The drawings show
    the detections scoring at least ``draw_thresh``; the results files hold them all.
    Returns the records of detections.json: one per image in the order of ``paths``, one
    per frame detected of a video; an unreadable image's record has no detections and an ``error``.
    When no input is readable, a one-line :class:`OreError` and nothing is written."""
    if every < 1:
        raise OreError(f"--every {every} must be ≥ 1")
    if not 0.0 <= draw_thresh <= 1.0:
        raise OreError(f"--draw-thresh {draw_thresh} is not in [0, 1]")
    formats = check_formats(formats)
    out = Path(output)
    max_pixels = predictor.cfg.INPUT.MAX_PIXELS
    names = _Names(out)
    records: list[dict] = []
    batch: list[Path] = []
    for i, p in enumerate(tqdm(paths, desc="detect", unit="input")):
        if is_video_file(p):
            records += _detect_video(predictor, p, out, names, every, batch_size, max_pixels,
                                     draw_thresh)
        else:
            batch.append(p)
        if batch and (len(batch) == batch_size or i + 1 == len(paths)
                      or is_video_file(paths[i + 1])):
            records += _detect_batch(predictor, batch, out, names, max_pixels, draw_thresh)
            batch = []
    if all("error" in r for r in records):
        first = records[0] if records else None
        raise OreError(f"no readable image among the {len(paths)} inputs"
                       + (f" ({first['image']}: {first['error']})" if first else ""))
    atomic_write_json(out / DETECTIONS_FILE, records)
    if "coco" in formats:
        results, dataset = coco_results(records, predictor.split.label_names)
        atomic_write_json(out / COCO_IMAGES, dataset)
        atomic_write_json(out / COCO_RESULTS, results)
    if "csv" in formats:
        atomic_write_text(out / CSV_FILE, csv_text(records))
    return records


def coco_results(records: list[dict], label_names) -> tuple[list[dict], dict]:
    """COCO results (``image_id``, ``category_id``, ``bbox`` as x, y, w, h, ``score``) of
    ``records``, and the COCO dataset they refer to: one image per readable record (a
    video frame is an image, ``file_name`` ``video.mp4#frame``), the categories by label
    index with ``unknown`` its own category, no annotations. ``pycocotools``' COCO of the
    dataset takes the results through ``loadRes``."""
    categories = [{"id": i, "name": n, "supercategory": "unknown" if n == UNKNOWN else "known"}
                  for i, n in enumerate(label_names) if i > 0]
    ids = {c["name"]: c["id"] for c in categories}
    images, results = [], []
    for r in (r for r in records if "error" not in r):
        image_id = len(images) + 1
        name = r["image"] + (f"#{r['frame']}" if "frame" in r else "")
        images.append({"id": image_id, "file_name": name, "height": r["height"],
                       "width": r["width"]})
        if not r["boxes"]:
            continue
        xyxy = np.asarray(r["boxes"], np.float64)  # [D, 4]
        xywh = np.round(np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1), 2)
        results += [{"image_id": image_id, "category_id": ids[label], "bbox": box,
                     "score": score}
                    for label, box, score in zip(r["labels"], xywh.tolist(), r["scores"])]
    return results, {"images": images, "categories": categories, "annotations": []}


def csv_text(records: list[dict]) -> str:
    """One row per detection (:data:`CSV_COLUMNS`), for a spreadsheet; energy columns are
    empty without EBUI, and an unreadable input has no rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in records:
        n = len(r["labels"])
        extra = [r.get(k) or [None] * n for k in ("energies", "known_logpdf", "unknown_logpdf")]
        w.writerows(
            [r["image"], r.get("frame", ""), r["drawn"], *box, label, int(label == UNKNOWN),
             score, *("" if v is None else v for v in e)]
            for box, label, score, *e in zip(r["boxes"], r["labels"], r["scores"], *extra))
    return buf.getvalue()
