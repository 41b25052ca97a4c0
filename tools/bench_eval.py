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
  peak RSS;
- end to end at ``--dets`` (annotations read + detections file read + evaluation), side by
  side in this process: ours with an empty annotation cache (cold), with it filled (warm),
  warm with a columnar ``.npz`` detections file, and the reference's style (each XML file
  parsed with ElementTree as its ``parse_rec`` does, ``json.load``, the naive evaluation);
  time ratios to the reference, and the peak traced memory of each (a second pass, under
  tracemalloc).

    python tools/bench_eval.py                  # 5,000 images, 375k detections, sweep
    python tools/bench_eval.py --images 500 --sweep 10000 50000 --naive-max 50000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ore.data.annotation_cache import CACHE_ENV
from ore.data.classes import OWOD_TASKS, load_task_split
from ore.data.records import as_listed, load_role_split
from ore.evaluation.coco import coco_ap
from ore.evaluation.detections import read_detections, write_columnar_detections
from ore.evaluation.evaluator import RESULT_KEYS, OpenWorldEvaluator
from ore.evaluation.metrics import Detections, GroundTruth, open_world_metrics

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


def write_detection_files(folder: Path, ev: OpenWorldEvaluator, dets: dict):
    """The detections as a JSON file (the documented entry list) and as a columnar .npz."""
    names = [ev.protocol.names[c] for c in dets["labels"].tolist()]
    entries = [{"image_id": i, "category": c, "score": s, "bbox": b} for i, c, s, b in zip(
        dets["image_ids"], names, dets["scores"].tolist(), dets["boxes"].tolist())]
    json_path = folder / "detections.json"
    json_path.write_text(json.dumps(entries))
    del entries
    npz_path = write_columnar_detections(folder / "detections.npz", dets["image_ids"], names,
                                         dets["scores"], dets["boxes"])
    return json_path, npz_path


def ours_end_to_end(root: Path, split, task: int, det_path: Path) -> tuple[dict, dict]:
    """Ours as ``ore eval-detections --no-coco`` runs it; seconds of each phase."""
    t0 = time.perf_counter()
    records = as_listed(load_role_split(root, "test", split, task, "test"), root, "test")
    t1 = time.perf_counter()
    dets = read_detections(det_path, split)
    t2 = time.perf_counter()
    ev = OpenWorldEvaluator(split=split, task=task, records=records, coco=False)
    ev.add_detections(**dets)
    del dets
    result = ev.evaluate(details=True)
    t3 = time.perf_counter()
    return result, {"annotations_s": t1 - t0, "detections_s": t2 - t1, "evaluate_s": t3 - t2}


def parse_rec(filename: Path) -> list[dict]:
    """One annotation file as the reference's evaluator reads it."""
    tree = ET.parse(filename)
    objects = []
    for obj in tree.findall("object"):
        bbox = obj.find("bndbox")
        objects.append({
            "name": obj.find("name").text,
            "difficult": int(obj.find("difficult").text),
            "bbox": [int(bbox.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")],
        })
    return objects


def reference_end_to_end(root: Path, split, task: int, det_path: Path) -> tuple[dict, dict]:
    """The reference's style: ElementTree per file, ``json.load``, per-detection loops."""
    ev = OpenWorldEvaluator(split=split, task=task, records=[], coco=False)  # the protocol
    protocol = ev.protocol
    seen = {protocol.names[c]: c for c in protocol.seen}
    t0 = time.perf_counter()
    ids = [line.strip() for line in (root / "ImageSets/Main/test.txt").read_text().splitlines()]
    recs = {i: parse_rec(root / "Annotations" / f"{i}.xml") for i in ids}
    index = {i: k for k, i in enumerate(ids)}
    objects = [(index[i], o) for i in ids for o in recs[i]]
    gt = GroundTruth(
        image=np.array([k for k, _ in objects], np.int64),
        label=np.array([seen.get(o["name"], protocol.unknown) for _, o in objects], np.int64),
        boxes=np.array([o["bbox"] for _, o in objects], np.float64).reshape(-1, 4),
        difficult=np.array([bool(o["difficult"]) for _, o in objects], bool),
        num_images=len(ids))
    t1 = time.perf_counter()
    with open(det_path) as f:
        entries = json.load(f)
    dets = Detections(
        image=np.array([index[e["image_id"]] for e in entries], np.int64),
        label=np.array([split.label(e["category"]) for e in entries], np.int64),
        score=np.array([e["score"] for e in entries], np.float64),
        boxes=np.array([e["bbox"] for e in entries], np.float64).reshape(-1, 4))
    t2 = time.perf_counter()
    result = naive_metrics(gt, dets, protocol)
    t3 = time.perf_counter()
    return result, {"annotations_s": t1 - t0, "detections_s": t2 - t1, "evaluate_s": t3 - t2}


def end_to_end(root: Path, split, task: int, json_path: Path, npz_path: Path,
               cache: Path) -> dict:
    """Each pipeline timed, then run again under tracemalloc for its peak; figures checked
    against the reference's."""
    runs = {
        "reference": lambda: reference_end_to_end(root, split, task, json_path),
        "ours_cold": lambda: ours_end_to_end(root, split, task, json_path),
        "ours_warm": lambda: ours_end_to_end(root, split, task, json_path),
        "ours_warm_npz": lambda: ours_end_to_end(root, split, task, npz_path),
    }
    out, figures = {}, {}
    for name, run in runs.items():
        for traced in (False, True):
            if name == "ours_cold":
                for f in cache.glob("annotations/*.npz"):
                    f.unlink()  # the cache is empty for both passes
            if traced:
                tracemalloc.start()
            t0 = time.perf_counter()
            result, phases = run()
            seconds = time.perf_counter() - t0
            if traced:
                out[name]["peak_traced_MiB"] = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
            else:
                out[name] = {"total_s": seconds, **phases}
                figures[name] = result
    for name, row in out.items():
        row["speedup"] = out["reference"]["total_s"] / row["total_s"]
        row["memory_vs_reference"] = (row["peak_traced_MiB"]
                                      / out["reference"]["peak_traced_MiB"])
        row["identical"] = not compare(figures[name], figures["reference"])
    return out


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
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                        help="skip the end-to-end comparison at --dets")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    split, task = load_task_split("owod"), 2
    report: dict = {"images": args.images, "seen_classes": len(split.seen(task))}

    tmp = tempfile.TemporaryDirectory()
    root, cache = Path(tmp.name) / "owod", Path(tmp.name) / "cache"
    os.environ[CACHE_ENV] = str(cache)  # an empty cache of this run's own
    write_dataset(root, args.images, rng)
    old = time.time_ns() - 3600 * 10**9  # a dataset at rest (fresh files are not cached)
    for f in (root / "Annotations").iterdir():
        os.utime(f, ns=(old, old))
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
        if d == args.dets and args.end_to_end:
            json_path, npz_path = write_detection_files(Path(tmp.name), ev0, dets)
            e2e = end_to_end(root, split, task, json_path, npz_path, cache)
            report["end_to_end"] = {"D": d, "json_MB": json_path.stat().st_size / 1e6,
                                    "npz_MB": npz_path.stat().st_size / 1e6, **e2e}
            print(f"  end to end at D={d} ({report['end_to_end']['json_MB']:.0f} MB JSON, "
                  f"{report['end_to_end']['npz_MB']:.0f} MB npz):")
            for name, r in e2e.items():
                print(f"    {name:14s} total {r['total_s']:7.3f} s (annotations "
                      f"{r['annotations_s']:.3f}, detections {r['detections_s']:.3f}, evaluate "
                      f"{r['evaluate_s']:.3f})  x{r['speedup']:.1f}  peak "
                      f"{r['peak_traced_MiB']:.0f} MiB ({r['memory_vs_reference']:.2f} of the "
                      f"reference)  identical={r['identical']}", flush=True)
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
    tmp.cleanup()
    identical = [r.get("identical", True) for r in rows]
    identical += [r["identical"] for r in report.get("end_to_end", {}).values()
                  if isinstance(r, dict)]
    return 0 if all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
