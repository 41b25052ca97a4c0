"""Benchmark the open-world evaluator against a naive per-detection implementation.

Generated data in the M-OWODB class layout (task 2 of ``owod``: 40 seen classes, the 40
classes of tasks 3–4 are unknown): N images written as VOC XML, about 8 objects each
(a quarter unknown, some difficult), detections near objects (right class, wrong class,
unknown) and in the background. Reports, in one run:

- XML parsing time (each annotation file parsed once for all classes);
- evaluation time of ``OpenWorldEvaluator`` (ingest + evaluate, COCO off) and of
  ``tests/evaluation/naive.py`` (the reference's per-class, per-detection style) on the same
  detections, checking that both give identical figures;
- a sweep of D (detections) with the log-log slope of time vs D;
- peak memory (tracemalloc: numpy buffers included) of one evaluation, and the process's
  peak RSS.

    python tools/bench_eval.py                  # 5,000 images, 375k detections, sweep
    python tools/bench_eval.py --images 500 --sweep 10000 50000 --naive-max 50000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ore.data.classes import OWOD_TASKS, load_task_split
from ore.data.records import load_role_split
from ore.evaluation.coco import coco_ap
from ore.evaluation.evaluator import RESULT_KEYS, OpenWorldEvaluator
from ore.evaluation.metrics import open_world_metrics

# The per-detection oracle lives with the tests; run as a script, tools/ is sys.path[0].
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.evaluation.naive import naive_metrics  # noqa: E402

W, H = 500, 375


def write_dataset(root: Path, n_images: int, rng: np.random.Generator) -> None:
    """VOC layout: ``n_images`` XML files (classes of all four tasks) and a test list."""
    classes = [c for t in OWOD_TASKS for c in t]
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_images):
        image_id = f"{i:06d}"
        ids.append(image_id)
        n = int(rng.integers(3, 14))
        # Three quarters of the objects from the 40 seen classes, a quarter unknown.
        labels = np.where(rng.random(n) < 0.75, rng.integers(0, 40, n), rng.integers(40, 80, n))
        wh = rng.uniform(20, 200, (n, 2))
        xy = rng.uniform(1, [W, H] - wh)
        objects = "".join(
            f"<object><name>{classes[c]}</name><difficult>{int(rng.random() < 0.05)}"
            f"</difficult><bndbox><xmin>{x0:.0f}</xmin><ymin>{y0:.0f}</ymin>"
            f"<xmax>{x0 + w:.0f}</xmax><ymax>{y0 + h:.0f}</ymax></bndbox></object>"
            for c, (x0, y0), (w, h) in zip(labels, xy, wh)
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{W}</width><height>{H}</height></size>"
            f"{objects}</annotation>"
        )
        (root / "JPEGImages" / f"{image_id}.jpg").touch()  # only its existence is checked
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")


def make_detections(ev: OpenWorldEvaluator, n_dets: int, rng: np.random.Generator):
    """About ``n_dets`` detections: 60% jittered copies of objects (70% right label, 15%
    another seen class, 15% unknown), 40% random background boxes with random labels."""
    gt = ev.gt
    seen = np.asarray(ev.protocol.seen)
    u = ev.protocol.unknown
    n_near = int(0.6 * n_dets)
    src = rng.integers(0, len(gt.label), n_near)
    size = gt.boxes[src, 2:] - gt.boxes[src, :2] + 1
    jitter = rng.normal(0, 0.12, (n_near, 4)) * np.concatenate([size, size], 1)
    near = np.round(gt.boxes[src] + jitter)
    choice = rng.random(n_near)
    near_label = np.where(choice < 0.7, gt.label[src], rng.choice(seen, n_near))
    near_label = np.where(choice > 0.85, u, near_label)
    n_bg = n_dets - n_near
    wh = rng.uniform(10, 250, (n_bg, 2))
    xy = rng.uniform(1, [W, H] - np.minimum(wh, [W - 2, H - 2]))
    bg = np.round(np.concatenate([xy, xy + wh], 1))
    bg_label = rng.choice(np.append(seen, u), n_bg)
    boxes = np.concatenate([near, bg])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    images = np.concatenate([gt.image[src], rng.integers(0, gt.num_images, n_bg)])
    ids = ev.image_ids
    return {
        "image_ids": [ids[i] for i in images],
        "labels": np.concatenate([near_label, bg_label]).astype(np.int64),
        "scores": rng.random(n_dets),
        "boxes": boxes,
    }


def time_ours(split, task, records, dets, repeat: int) -> tuple[float, dict, OpenWorldEvaluator]:
    best, result, ev = float("inf"), None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        ev = OpenWorldEvaluator(split=split, task=task, records=records, coco=False)
        ev.add_detections(**dets)
        result = ev.evaluate(details=True)
        best = min(best, time.perf_counter() - t0)
    return best, result, ev


def compare(fast: dict, slow: dict) -> list[str]:
    """Keys whose values differ (the naive dict has the same keys, COCO aside)."""
    return [k for k in slow if k != "coco" and fast.get(k) != slow[k]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=375_000, help="main comparison size")
    parser.add_argument("--sweep", type=int, nargs="*",
                        default=[10_000, 30_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--naive-max", type=int, default=375_000,
                        help="run the naive baseline only up to this many detections")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for our evaluator")
    parser.add_argument("--coco", action="store_true", help="also time pycocotools at --dets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    split, task = load_task_split("owod"), 2
    report: dict = {"images": args.images, "seen_classes": len(split.seen(task))}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "owod"
        write_dataset(root, args.images, rng)
        t0 = time.perf_counter()
        records = load_role_split(root, "test", split, task, "test")
        report["xml_parse_s"] = time.perf_counter() - t0
    n_obj = sum(len(r.names) for r in records)
    print(f"{args.images} images, {n_obj} objects; XML parsed once for all classes in "
          f"{report['xml_parse_s']:.2f} s")

    sizes = sorted(set(args.sweep) | {args.dets})
    rows = []
    for d in sizes:
        ev0 = OpenWorldEvaluator(split=split, task=task, records=records, coco=False)
        dets = make_detections(ev0, d, rng)
        ours, fast, ev = time_ours(split, task, records, dets, args.repeat)
        row = {"D": d, "ours_s": ours}
        if d <= args.naive_max:
            plain = ev.evaluable_detections()
            t0 = time.perf_counter()
            slow = naive_metrics(ev.gt, plain, ev.protocol)
            row["naive_s"] = time.perf_counter() - t0
            row["speedup"] = row["naive_s"] / ours
            diff = compare(fast, slow)
            row["identical"] = not diff
            if diff:
                print(f"  MISMATCH at D={d}: {diff}")
        if d in (args.dets, sizes[-1]):
            tracemalloc.start()
            open_world_metrics(ev.gt, ev.evaluable_detections(), ev.protocol)
            row["peak_traced_MiB"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        if d == args.dets:
            report["figures"] = {k: fast[k] for k in RESULT_KEYS if k not in ("per_class_ap",)}
            if args.coco:
                t0 = time.perf_counter()
                known = ev.protocol.seen
                report["figures"]["coco"] = coco_ap(ev.gt, ev.evaluable_detections(), known)
                row["coco_s"] = time.perf_counter() - t0
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)

    sweep = [r for r in rows if r["D"] in set(args.sweep)]
    if len(sweep) >= 2:
        x = np.log([r["D"] for r in sweep])
        report["slope_ours"] = float(np.polyfit(x, np.log([r["ours_s"] for r in sweep]), 1)[0])
        upper = [r for r in sweep if r["D"] >= 100_000]
        if len(upper) >= 2:  # without the fixed costs that flatten the small sizes
            report["slope_ours_from_100k"] = float(np.polyfit(
                np.log([r["D"] for r in upper]), np.log([r["ours_s"] for r in upper]), 1)[0])
        naive_rows = [r for r in sweep if "naive_s" in r]
        if len(naive_rows) >= 2:
            report["slope_naive"] = float(np.polyfit(
                np.log([r["D"] for r in naive_rows]), np.log([r["naive_s"] for r in naive_rows]),
                1)[0])
    report["rows"] = rows
    report["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    nan = float("nan")
    print(f"log-log slope of time vs D (ours, {sweep[0]['D']}..{sweep[-1]['D']}): "
          f"{report.get('slope_ours', nan):.3f}; ours from 100k: "
          f"{report.get('slope_ours_from_100k', nan):.3f}; naive: "
          f"{report.get('slope_naive', nan):.3f}")
    print(f"peak RSS of the whole run: {report['peak_rss_MiB']:.0f} MiB")
    print(json.dumps(report["figures"], indent=None)[:800])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if all(r.get("identical", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
