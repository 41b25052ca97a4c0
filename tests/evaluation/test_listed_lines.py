"""Lists that name an image more than once: the published protocol (every listed line)
against a per-line oracle, the de-duplicated protocol, and one model run per image."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from ore.config import load_config
from ore.data.classes import UNKNOWN, TaskSplit, load_task_split
from ore.data.records import ImageRecord, as_listed, load_role_split, read_list_lines
from ore.engine.evaluate import evaluate_model
from ore.evaluation.evaluator import OpenWorldEvaluator
from ore.evaluation.report import format_table

SPLIT = TaskSplit("abc", (("a", "b"), ("c",)), never_introduced=("z",))
PROTOCOL_KEYS = ("protocol", "listed_lines", "unique_images")


# ----------------------------------------------------------------------------- the oracle


def _iou(bb, gts):
    """IoU of one box with each row of ``gts``, VOC pixel convention (+1 on sizes)."""
    iw = np.maximum(np.minimum(gts[:, 2], bb[2]) - np.maximum(gts[:, 0], bb[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gts[:, 3], bb[3]) - np.maximum(gts[:, 1], bb[1]) + 1.0, 0.0)
    inter = iw * ih
    union = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
             + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0) - inter)
    return inter / union


def _allpoint_ap(rec, prec):
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1)
               if mrec[i + 1] != mrec[i])


def oracle(lines, objects, detections, task):
    """The published protocol written out per line: the detections file holds every
    image's detections once per line that names it (the model ran per line); positives
    are counted per line; the claims on an image's objects live in one dict keyed by the
    image id, so every line of that image shares them.

    objects: id → [(name, box, difficult)], names already ``unknown`` where unseen.
    detections: id → [(name, score, box)]. Returns percent figures (WI a fraction).
    """
    seen = [c for t in SPLIT.tasks[:task] for c in t]
    previous = [c for t in SPLIT.tasks[:task - 1] for c in t]
    detfile = [(i, name, score, np.asarray(b, float)) for i in lines
               for name, score, b in detections.get(i, [])]
    out = {"ap": {}, "recall": {}, "precision": {}, "a_ose": 0, "wi": {}}
    curves = {}
    for cls in (*seen, UNKNOWN):
        npos = 0
        gt = {}
        for i in lines:  # once per line: a repeated image counts again
            objs = [o for o in objects[i] if o[0] == cls]
            npos += sum(1 for o in objs if not o[2])
            gt[i] = {"boxes": np.asarray([o[1] for o in objs], float).reshape(-1, 4),
                     "difficult": [o[2] for o in objs], "claimed": [False] * len(objs)}
        unk = {i: np.asarray([o[1] for o in objects[i] if o[0] == UNKNOWN],
                             float).reshape(-1, 4) for i in lines}
        ranked = sorted((d for d in detfile if d[1] == cls), key=lambda d: -d[2])
        tp, fp, is_unk = [], [], []
        for image_id, _, _, bb in ranked:
            g = gt[image_id]
            t = f = 0.0
            if len(g["boxes"]):
                ov = _iou(bb, g["boxes"])
                j = int(np.argmax(ov))
                if ov[j] > 0.5:
                    if not g["difficult"][j]:
                        if g["claimed"][j]:
                            f = 1.0
                        else:
                            t = 1.0
                            g["claimed"][j] = True
                else:
                    f = 1.0
            else:
                f = 1.0
            tp.append(t)
            fp.append(f)
            u = unk[image_id]
            is_unk.append(float(cls != UNKNOWN and len(u) > 0 and _iou(bb, u).max() > 0.5))
        tp, fp, is_unk = np.cumsum(tp), np.cumsum(fp), np.cumsum(is_unk)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out["ap"][cls] = 100.0 * _allpoint_ap(rec, prec)
        out["recall"][cls] = 100.0 * rec[-1] if len(rec) else 0.0
        out["precision"][cls] = 100.0 * prec[-1] if len(prec) else 0.0
        if cls != UNKNOWN:
            out["a_ose"] += int(is_unk[-1]) if len(is_unk) else 0
        curves[cls] = (rec, tp + fp, is_unk)
    for r in [k / 10 for k in range(1, 10)]:
        counted, fps = [], []
        for cls in seen:
            rec, tp_plus_fp, fp_os = curves[cls]
            if len(rec):
                k = min(range(len(rec)), key=lambda i: abs(rec[i] - r))
                counted.append(tp_plus_fp[k])
                fps.append(fp_os[k])
        out["wi"][f"{r:.1f}"] = float(np.mean(fps) / np.mean(counted)) if counted else 0.0
    out["mAP_prev"] = float(np.mean([out["ap"][c] for c in previous])) if previous else None
    out["mAP_current"] = float(np.mean([out["ap"][c] for c in SPLIT.tasks[task - 1]]))
    out["mAP_both"] = float(np.mean([out["ap"][c] for c in seen]))
    return out


# ----------------------------------------------------------------------------- a world


def world(seed, task):
    """Images with objects of every class (some difficult), jittered detections with
    distinct scores, and a list that names some images two or three times."""
    rng = np.random.default_rng(seed)
    seen = {c for t in SPLIT.tasks[:task] for c in t}
    names = ["a", "b", "c", "z"]
    objects, detections = {}, {}
    for k in range(7):
        image_id = f"img{k}"
        n = int(rng.integers(1, 6)) if k else 4
        objs = []
        for m in range(n):
            name = names[m] if k == 0 else names[int(rng.integers(0, 4))]  # img0: one each
            x, y = (int(v) for v in rng.integers(1, 200, 2))
            w, h = (int(v) for v in rng.integers(10, 60, 2))
            difficult = bool(k and rng.random() < 0.15)
            objs.append((name if name in seen else UNKNOWN, [x, y, x + w, y + h], difficult))
        objects[image_id] = objs
        dets = []
        for name, b, _ in objs:
            for _ in range(int(rng.integers(0, 3))):  # near or on the object
                label = name if rng.random() < 0.7 else str(rng.choice([*sorted(seen),
                                                                        UNKNOWN]))
                jitter = rng.integers(-6, 7, 4)
                bb = [float(v) for v in np.asarray(b) + jitter]
                bb[2], bb[3] = max(bb[2], bb[0]), max(bb[3], bb[1])
                dets.append((label, float(rng.random()), bb))
        for _ in range(int(rng.integers(0, 3))):  # background
            x, y = (float(v) for v in rng.integers(250, 400, 2))
            dets.append((str(rng.choice([*sorted(seen), UNKNOWN])), float(rng.random()),
                         [x, y, x + 20.0, y + 20.0]))
        detections[image_id] = dets
    ids = list(objects)
    lines = ids + [str(i) for i in rng.choice(ids[1:], size=4)]  # repeats, some twice more
    rng.shuffle(lines)
    return [str(i) for i in lines], objects, detections


def record(image_id, objs):
    return ImageRecord(
        image_id=image_id, file_name=f"{image_id}.jpg", width=500, height=500,
        boxes=np.asarray([o[1] for o in objs], np.float32).reshape(-1, 4),
        names=[o[0] for o in objs], difficult=np.asarray([o[2] for o in objs], bool))


def evaluator(lines, objects, detections, task, unique_images=False):
    records = [record(i, objects[i]) for i in lines]
    ev = OpenWorldEvaluator(split=SPLIT, task=task, records=records, coco=False,
                            unique_images=unique_images)
    rows = [(i, SPLIT.label(n) if n != UNKNOWN else SPLIT.unknown_label, s, b)
            for i in dict.fromkeys(lines) for n, s, b in detections[i]]  # each image once
    ids, labels, scores, boxes = zip(*rows)
    ev.add_detections(list(ids), np.array(labels), np.array(scores), np.array(boxes, float))
    return ev.evaluate(details=True)


def assert_matches_oracle(result, expected, task):
    seen = [c for t in SPLIT.tasks[:task] for c in t]
    for cls in (*seen, UNKNOWN):
        assert result["per_class_ap"][cls] == pytest.approx(expected["ap"][cls], abs=1e-9)
        assert result["per_class_recall"][cls] == pytest.approx(expected["recall"][cls],
                                                                abs=1e-9)
        assert result["per_class_precision"][cls] == pytest.approx(
            expected["precision"][cls], abs=1e-9)
    assert result["unknown_recall"] == pytest.approx(expected["recall"][UNKNOWN], abs=1e-9)
    assert result["unknown_ap"] == pytest.approx(expected["ap"][UNKNOWN], abs=1e-9)
    assert result["a_ose"] == expected["a_ose"]
    for key in ("mAP_prev", "mAP_current", "mAP_both"):
        if expected[key] is None:
            assert result[f"known_{key}"] is None
        else:
            assert result[f"known_{key}"] == pytest.approx(expected[key], abs=1e-9)
    assert set(result["wilderness_impact"]) == set(expected["wi"])
    for r, wi in expected["wi"].items():
        assert result["wilderness_impact"][r] == pytest.approx(wi, abs=1e-9)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("task", [1, 2])
@pytest.mark.parametrize("seed", range(12))
def test_listed_lines_equal_the_per_line_oracle(seed, task):
    lines, objects, detections = world(seed, task)
    assert len(set(lines)) < len(lines)
    result = evaluator(lines, objects, detections, task)
    assert (result["protocol"], result["listed_lines"], result["unique_images"]) == (
        "listed-lines", len(lines), len(set(lines)))
    assert_matches_oracle(result, oracle(lines, objects, detections, task), task)


@pytest.mark.parametrize("task", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_unique_images_equal_the_deduplicated_list(seed, task):
    lines, objects, detections = world(seed, task)
    unique_lines = list(dict.fromkeys(lines))
    unique = evaluator(lines, objects, detections, task, unique_images=True)
    dedup = evaluator(unique_lines, objects, detections, task)
    assert (unique["protocol"], unique["listed_lines"], unique["unique_images"]) == (
        "unique-images", len(lines), len(unique_lines))
    assert dedup["protocol"] == "listed-lines"  # no repeat: the two protocols coincide
    figures = [k for k in unique if k not in PROTOCOL_KEYS]
    assert {k: unique[k] for k in figures} == {k: dedup[k] for k in figures}
    assert_matches_oracle(unique, oracle(unique_lines, objects, detections, task), task)
    # The repeats do change the figures (so the protocols are told apart for a reason).
    listed = evaluator(lines, objects, detections, task)
    assert listed["num_positives"] != unique["num_positives"]


def test_table_names_the_protocol():
    lines, objects, detections = world(0, 1)
    text = format_table(evaluator(lines, objects, detections, 1))
    assert f"protocol listed-lines: {len(lines)} listed lines, 7 unique images" in text
    text = format_table(evaluator(lines, objects, detections, 1, unique_images=True))
    assert "protocol unique-images" in text and "each image counted once" in text


# ----------------------------------------------------------------------------- the model


TOY_OBJECTS = {
    "img0": [("circle", [11, 11, 50, 50], 0), ("spiral", [81, 81, 120, 120], 0)],
    "img1": [("square", [21, 21, 60, 60], 0)],
    "img2": [("spiral", [11, 91, 50, 130], 0)],
}
TOY_LIST = ["img0", "img1", "img0", "img2", "img0"]


@pytest.fixture
def toy_voc(tmp_path):
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for name, objs in TOY_OBJECTS.items():
        body = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for n, b, d in objs)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>160</width><height>160</height><depth>3</depth>"
            f"</size>{body}</annotation>")
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.zeros((160, 160, 3), np.uint8))
    (root / "ImageSets/Main/test.txt").write_text("".join(i + "\n" for i in TOY_LIST))
    return root


class CountingPredictor:
    """Every image gets the same detections (model boxes: 0-based); counts the images."""

    BOXES = np.array([[10.0, 10.0, 49.0, 49.0], [80.0, 80.0, 119.0, 119.0],
                      [10.0, 90.0, 49.0, 129.0]])

    def __init__(self, cfg, split):
        self.cfg, self.split, self.images = cfg, split, 0
        self.labels = np.array([split.label("circle"), split.label("square"),
                                split.unknown_label])

    def predict_tensors(self, images):
        self.images += len(images)
        return [SimpleNamespace(boxes=self.BOXES, labels=self.labels,
                                scores=np.array([0.9, 0.8, 0.7])) for _ in images]


@pytest.mark.parametrize("unique", [False, True])
def test_model_runs_once_per_image_and_repeats_count_in_evaluation(toy_voc, unique, caplog):
    overrides = [f"DATASETS.ROOT={toy_voc}", "DATASETS.CLASSES=toy", "DATALOADER.NUM_WORKERS=0"]
    if unique:
        overrides.append("DATASETS.TEST_UNIQUE_IMAGES=true")
    cfg = load_config(None, overrides)
    split = load_task_split("toy")
    predictor = CountingPredictor(cfg, split)
    with caplog.at_level("INFO"):
        result, title = evaluate_model(predictor, "test", coco=False, batch_size=2)
    assert predictor.images == 3  # img0 is listed three times but detected once
    assert read_list_lines(toy_voc / "ImageSets/Main/test.txt") == TOY_LIST
    assert (result["listed_lines"], result["unique_images"]) == (5, 3)
    assert result["protocol"] == ("unique-images" if unique else "listed-lines")
    assert "test: 5 lines, 3 unique images" in caplog.text
    assert result["protocol"] in title
    # The same figures from the detections given directly, on the list as listed.
    records = load_role_split(toy_voc, "test", split, 1, "test")
    ev = OpenWorldEvaluator(split=split, task=1, records=as_listed(records, toy_voc, "test"),
                            coco=False, unique_images=unique)
    boxes = CountingPredictor.BOXES + np.array([1.0, 1.0, 0.0, 0.0])
    ids = [i for i in TOY_OBJECTS for _ in range(3)]
    ev.add_detections(ids, np.tile(predictor.labels, 3), np.tile([0.9, 0.8, 0.7], 3),
                      np.tile(boxes, (3, 1)))
    assert ev.evaluate(details=True) == result
    # Only img2's spiral is found as unknown; img0's spiral counts once per line (three
    # times) and its square detection sits on it once per line.
    assert result["unknown_recall"] == pytest.approx(100 * 1 / 2 if unique else 100 * 1 / 4)
    assert result["a_ose"] == (1 if unique else 3)
