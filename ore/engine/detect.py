"""Detection on a user's images: drawn copies (unknowns in their own colour) and
``detections.json``.

The output folder is kept apart from the inputs (:func:`check_detect_paths`, before any
work), and a file in it that detect did not write is never replaced: a drawn copy whose
name is taken gets a suffix. An image that cannot be read (or is over
``INPUT.MAX_PIXELS``) is skipped with a warning and listed in ``detections.json`` with
its ``error``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
from tqdm import tqdm

from ore.data.images import UnreadableImage, decode_image
from ore.engine.inference import Predictor
from ore.errors import OreError
from ore.fileio import atomic_write, atomic_write_json, check_output_dir, read_json
from ore.vis.draw import draw_detections

log = logging.getLogger(__name__)

DETECTIONS_FILE = "detections.json"


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
    return {p.name for p in out.iterdir()} - ours


def check_detect_paths(inputs: list[str | Path], output: str | Path) -> Path:
    """Before any work: ``output`` is a folder that can be written, and it neither is,
    contains nor lies inside an input (drawn copies would replace the photos)."""
    out = check_output_dir(output)
    real_out = Path(os.path.realpath(out))
    for raw in inputs:
        real_in = Path(os.path.realpath(raw))
        if real_out.is_relative_to(real_in) or real_in.is_relative_to(real_out):
            raise OreError(f"--output {output} overlaps the input {raw} (it is, contains or "
                           "lies inside it): choose an output folder apart from the images")
    _files_of_others(out)
    return out


def _failed(path: Path, reason: str) -> dict:
    log.warning("skipping %s: %s", path, reason)
    return {"image": str(path), "drawn": None, "boxes": [], "labels": [], "scores": [],
            "error": reason}


def detect_images(predictor: Predictor, paths: list[Path], output: str | Path,
                  batch_size: int = 4) -> list[dict]:
    """Run ``predictor`` on ``paths``; write ``<output>/<stem>.jpg`` (drawn) per image and
    ``<output>/detections.json``. Returns the records of that file, one per image in the
    order of ``paths``; an unreadable image's record has no detections and an ``error``.
    When no image is readable, a one-line :class:`OreError` and nothing is written."""
    out = Path(output)
    max_pixels = predictor.cfg.INPUT.MAX_PIXELS
    records, used_names = [], _files_of_others(out)
    for start in tqdm(range(0, len(paths), batch_size), desc="detect", unit="batch"):
        chunk = paths[start:start + batch_size]
        images: list = []  # per path: the image, or the record of its failure
        for p in chunk:
            try:
                images.append(decode_image(p, max_pixels))
            except UnreadableImage as exc:
                images.append(_failed(p, exc.reason))
        readable = [img for img in images if not isinstance(img, dict)]
        dets = iter(predictor.predict(readable) if readable else [])
        for p, img in zip(chunk, images):
            if isinstance(img, dict):
                records.append(img)
                continue
            det = next(dets)
            drawn = draw_detections(img, det.boxes, det.names, det.scores)
            name = p.stem + ".jpg"
            k = 1
            while name in used_names:  # same file name from two folders, or not ours
                name, k = f"{p.stem}_{k}.jpg", k + 1
            used_names.add(name)
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            atomic_write(out / name, lambda f, data=jpg: f.write(data.tobytes()))
            records.append({
                "image": str(p), "drawn": name,
                "boxes": [[round(float(v), 2) for v in b] for b in det.boxes],
                "labels": det.names, "scores": [round(float(s), 4) for s in det.scores],
            })
    if all("error" in r for r in records):
        first = records[0] if records else None
        raise OreError(f"no readable image among the {len(paths)} inputs"
                       + (f" ({first['image']}: {first['error']})" if first else ""))
    atomic_write_json(out / DETECTIONS_FILE, records)
    return records
