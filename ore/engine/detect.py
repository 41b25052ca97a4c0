"""``ore detect``: draw detections (unknowns in their own colour) and write detections.json."""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the config the weights were trained with")
    p.add_argument("--weights", required=True, help="detector checkpoint (model_final.pth)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--output", required=True, help="folder for drawn images + detections.json")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections under this score (default: the config's)")
    p.add_argument("--batch-size", type=int, default=4)


def collect_images(inputs: list[str]) -> list[Path]:
    from ore.errors import OreError

    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise OreError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {p}")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise OreError(f"input not found: {p}")
    return paths


def run(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    from ore.config import load_config
    from ore.data.dataset import read_image_rgb
    from ore.engine.inference import Predictor
    from ore.errors import OreError
    from ore.fileio import atomic_write, atomic_write_json
    from ore.vis import draw_detections

    if args.score_thresh is not None and not 0.0 <= args.score_thresh <= 1.0:
        raise OreError(f"--score-thresh {args.score_thresh} is not in [0, 1]")
    if args.batch_size < 1:
        raise OreError(f"--batch-size {args.batch_size} must be ≥ 1")
    paths = collect_images(args.inputs)
    predictor = Predictor(load_config(args.config), args.weights,
                          args.score_thresh)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records, used_names = [], set()
    for start in tqdm(range(0, len(paths), args.batch_size), desc="detect", unit="batch"):
        chunk = paths[start:start + args.batch_size]
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
    atomic_write_json(out / "detections.json", records)
    n_unknown = sum(label == "unknown" for r in records for label in r["labels"])
    n_total = sum(len(r["labels"]) for r in records)
    print(f"{len(records)} images, {n_total} detections ({n_unknown} unknown) → {out}")
    return 0
