"""Detection on a user's images: drawn copies (unknowns in their own colour) and
``detections.json``."""

from __future__ import annotations

from pathlib import Path

import cv2
from tqdm import tqdm

from ore.data.dataset import read_image_rgb
from ore.engine.inference import Predictor
from ore.errors import OreError
from ore.fileio import atomic_write, atomic_write_json
from ore.vis.draw import draw_detections

DETECTIONS_FILE = "detections.json"


def detect_images(predictor: Predictor, paths: list[Path], output: str | Path,
                  batch_size: int = 4) -> list[dict]:
    """Run ``predictor`` on ``paths``; write ``<output>/<stem>.jpg`` (drawn) per image and
    ``<output>/detections.json``. Returns the records of that file, one per image."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records, used_names = [], set()
    for start in tqdm(range(0, len(paths), batch_size), desc="detect", unit="batch"):
        chunk = paths[start:start + batch_size]
        images = []
        for p in chunk:
            img = read_image_rgb(str(p))
            if img is None:
                raise OreError(f"cannot read image {p}: missing or not a decodable image")
            images.append(img)
        for p, img, det in zip(chunk, images, predictor.predict(images)):
            drawn = draw_detections(img, det.boxes, det.names, det.scores)
            name = p.stem + ".jpg"
            k = 1
            while name in used_names:  # same file name from two folders
                name, k = f"{p.stem}_{k}.jpg", k + 1
            used_names.add(name)
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            atomic_write(out / name, lambda f, data=jpg: f.write(data.tobytes()))
            records.append({
                "image": str(p), "drawn": name,
                "boxes": [[round(float(v), 2) for v in b] for b in det.boxes],
                "labels": det.names, "scores": [round(float(s), 4) for s in det.scores],
            })
    atomic_write_json(out / DETECTIONS_FILE, records)
    return records
