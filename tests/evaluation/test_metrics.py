"""Open-world evaluator: hand-computed figures, agreement with a naive oracle and with
pycocotools, order invariance, and property-based invariants."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ore.data.classes import TaskSplit
from ore.data.records import ImageRecord
from ore.errors import OreError
from ore.evaluation import metrics
from ore.evaluation.evaluator import DETAIL_KEYS, RESULT_KEYS, OpenWorldEvaluator
from ore.evaluation.metrics import open_world_metrics, voc_ap
from tests.evaluation.naive import naive_metrics

# Task 1 knows a, b; c (task 2) and z (never introduced) are unknown in task 1.
SPLIT = TaskSplit("abc", (("a", "b"), ("c",)), never_introduced=("z",))
A, B, C, UNK = 1, 2, 3, 4


def box(x, y, s=10):
    """A VOC box with top-left (x, y) and side s pixels (inclusive corners)."""
    return [x, y, x + s - 1, y + s - 1]


def record(image_id, objects):
    """objects: list of (name, box) or (name, box, difficult)."""
    objects = [o if len(o) == 3 else (*o, False) for o in objects]
    return ImageRecord(
        image_id=image_id, file_name=f"{image_id}.jpg", width=500, height=500,
        boxes=np.asarray([o[1] for o in objects], np.float32).reshape(-1, 4),
        names=[o[0] for o in objects], difficult=np.asarray([o[2] for o in objects], bool),
    )


def evaluate(records, dets, task=1, ap="allpoint", coco=False, details=True):
    """dets: list of (image_id, label, score, box) in annotation coordinates."""
    ev = OpenWorldEvaluator(split=SPLIT, task=task, records=records, ap=ap, coco=coco)
    if dets:
        ids, labels, scores, boxes = zip(*dets)
        ev.add_detections(list(ids), np.array(labels), np.array(scores), np.array(boxes, float))
    return ev.evaluate(details=details)


# ----------------------------------------------------------------------------- AP


AP_RECORDS = [
    record("i0", [("a", box(1, 1)), ("a", box(21, 21))]),
    record("i1", [("a", box(1, 1))]),
]
AP_DETS = [
    ("i0", A, 0.9, box(1, 1)),     # TP
    ("i1", A, 0.8, box(200, 200)),  # FP (nothing there)
    ("i1", A, 0.7, box(1, 1)),     # TP
    ("i0", A, 0.6, box(1, 1)),     # FP: its best box was already claimed
]
# Ranked: TP FP TP FP over 3 positives. recall 1/3 1/3 2/3 2/3; precision 1 1/2 2/3 1/2.


def test_ap_allpoint_hand_computed():
    r = evaluate(AP_RECORDS, AP_DETS)
    # Envelope 1 up to recall 1/3, 2/3 up to 2/3: AP = 1/3·1 + 1/3·2/3 = 5/9.
    assert r["per_class_ap"]["a"] == pytest.approx(100 * 5 / 9)
    assert r["per_class_recall"]["a"] == pytest.approx(100 * 2 / 3)
    assert r["per_class_precision"]["a"] == pytest.approx(50.0)
    assert r["num_positives"]["a"] == 3 and r["num_detections"]["a"] == 4


def test_ap_11point_differs_from_allpoint():
    r = evaluate(AP_RECORDS, AP_DETS, ap="11point")
    # Thresholds 0, .1, .2, .3 → 1; .4, .5, .6 → 2/3; .7 … 1 → 0.  (4 + 2) / 11.
    assert r["per_class_ap"]["a"] == pytest.approx(100 * 6 / 11)
    assert r["per_class_ap"]["a"] != pytest.approx(100 * 5 / 9)


def test_voc_ap_edge_cases():
    empty = np.zeros(0)
    assert voc_ap(empty, empty) == 0.0
    assert voc_ap(empty, empty, "11point") == 0.0
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        voc_ap(empty, empty, "101point")


# ------------------------------------------------------- unknowns, WI, A-OSE, UDR/UDP

OPEN_RECORDS = [
    record("i0", [("a", box(1, 1)), ("c", box(51, 51))]),  # c is unknown in task 1
    record("i1", [("a", box(1, 1)), ("b", box(101, 101), False), ("z", box(51, 51))]),
]
OPEN_DETS = [
    ("i0", A, 0.9, box(51, 51)),   # on unknown U1: FP, open-set
    ("i0", A, 0.8, box(1, 1)),     # TP
    ("i0", A, 0.7, box(52, 51)),   # on U1 again (IoU 0.82): FP, open-set: A-OSE counts it
    ("i1", A, 0.6, box(300, 300)),  # FP
    ("i1", B, 0.5, box(101, 101)),  # TP
    ("i1", B, 0.4, box(51, 51)),   # on unknown U2: FP, open-set
    ("i0", UNK, 0.9, box(51, 51)),  # unknown TP on U1
    ("i0", UNK, 0.3, box(400, 400)),  # unknown FP
]


def test_open_set_figures_hand_computed():
    r = evaluate(OPEN_RECORDS, OPEN_DETS)
    # a: ranked FP TP FP FP over 2 positives → recall 0 .5 .5 .5, precision 0 .5 1/3 1/4;
    # envelope 1/2 up to recall 1/2 → AP 25. b: TP FP over 1 → AP 100.
    assert r["per_class_ap"] == pytest.approx({"a": 25.0, "b": 100.0, "unknown": 50.0})
    assert r["known_mAP_prev"] is None  # task 1: no previously known class
    assert r["known_mAP_current"] == pytest.approx(62.5)
    assert r["known_mAP_both"] == pytest.approx(62.5)
    # Unknown: TP FP over 2 unknown objects (c in i0, z in i1).
    assert r["unknown_recall"] == pytest.approx(50.0)
    assert r["unknown_precision"] == pytest.approx(50.0)
    assert r["unknown_ap"] == pytest.approx(50.0)
    # A-OSE counts detections: two on U1 (same object) + one on U2.
    assert r["a_ose"] == 3 and isinstance(r["a_ose"], int)
    # TP_u = {U1}; FN*_u = {U1, U2} − {U1} = {U2}: UDR = (1+1)/2, UDP = 1/(1+1).
    assert r["udr"] == pytest.approx(100.0)
    assert r["udp"] == pytest.approx(50.0)


def test_wilderness_impact_hand_computed_including_unreached_recall():
    wi = evaluate(OPEN_RECORDS, OPEN_DETS)["wilderness_impact"]
    assert list(wi) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    # a: recall 0 .5 .5 .5, open-set FPs 1 1 2 2, counted 1 2 3 4.
    # b: recall 1 1, open-set FPs 0 1, counted 1 2.
    # r = 0.8: a never reaches it; closest recall 0.5, first at rank 1 → (1, 2);
    #          b closest 1.0 at rank 0 → (0, 1). WI = mean(1, 0) / mean(2, 1) = 1/3.
    assert wi["0.8"] == pytest.approx(1 / 3)
    assert wi["0.9"] == pytest.approx(1 / 3)
    # r = 0.1: a closest is recall 0 at rank 0 → (1, 1); b → (0, 1). WI = 0.5 / 1.
    assert wi["0.1"] == pytest.approx(0.5)
    # r = 0.3: |0 − .3| > |.5 − .3| → a at rank 1 → (1, 2); b → (0, 1). 1/3 again.
    assert wi["0.3"] == pytest.approx(1 / 3)


def test_a_ose_counts_every_duplicate():
    records = [record("i0", [("a", box(1, 1)), ("c", box(51, 51))])]
    dets = [("i0", A, 0.9 - 0.01 * k, box(51, 51)) for k in range(7)]
    dets += [("i0", B, 0.5, box(51, 51))]
    r = evaluate(records, dets)
    assert r["a_ose"] == 8
    # One unknown object, detected as known only: UDR 100, UDP 0.
    assert r["udr"] == pytest.approx(100.0) and r["udp"] == pytest.approx(0.0)
    assert r["unknown_recall"] == 0.0


def test_difficult_objects_are_ignored():
    records = [record("i0", [("a", box(1, 1)), ("a", box(51, 51), True),
                             ("a", box(101, 101), True)])]
    # One detection on the difficult box (neither TP nor FP), one on the ordinary box;
    # the other difficult box is never detected and must not lower the recall.
    dets = [("i0", A, 0.9, box(51, 51)), ("i0", A, 0.8, box(1, 1))]
    r = evaluate(records, dets)
    assert r["num_positives"]["a"] == 1
    assert r["per_class_recall"]["a"] == pytest.approx(100.0)
    assert r["per_class_precision"]["a"] == pytest.approx(100.0)
    assert r["per_class_ap"]["a"] == pytest.approx(100.0)


def test_difficult_unknowns_count_for_a_ose_but_not_for_unknown_recall():
    records = [record("i0", [("a", box(1, 1)), ("c", box(51, 51), True),
                             ("c", box(101, 101))])]
    dets = [("i0", A, 0.9, box(51, 51)), ("i0", UNK, 0.8, box(51, 51))]
    r = evaluate(records, dets)
    assert r["a_ose"] == 1  # the reference's rule: every unknown object counts
    assert r["num_positives"]["unknown"] == 1
    assert r["unknown_recall"] == 0.0 and r["unknown_precision"] == 0.0  # ignored row
    assert r["udr"] == 0.0 and r["udp"] is None  # the difficult one takes no part


def test_repeated_image_ids_count_per_line_unless_unique_images(caplog):
    once = evaluate(AP_RECORDS, AP_DETS)
    assert (once["protocol"], once["listed_lines"], once["unique_images"]) == (
        "listed-lines", 2, 2)
    listed = AP_RECORDS + [AP_RECORDS[0]]
    with caplog.at_level(logging.INFO):
        twice = evaluate(listed, AP_DETS)
    assert "3 lines, 2 unique images" in caplog.text and "--unique-images" in caplog.text
    # i0 counts twice: 2·2 + 1 = 5 positives; its detections twice, the second copy of a
    # TP an FP (the claims are shared): TP FP FP TP FP FP.
    assert twice["num_positives"]["a"] == 5 and twice["num_detections"]["a"] == 6
    assert twice["per_class_recall"]["a"] == pytest.approx(40.0)
    assert twice["per_class_ap"]["a"] == pytest.approx(100 * (0.2 * 1 + 0.2 * 0.5))
    ev = OpenWorldEvaluator(split=SPLIT, task=1, records=listed, coco=False,
                            unique_images=True)
    ids, labels, scores, boxes = zip(*AP_DETS)
    ev.add_detections(list(ids), np.array(labels), np.array(scores), np.array(boxes, float))
    unique = ev.evaluate(details=True)
    assert (unique["protocol"], unique["listed_lines"], unique["unique_images"]) == (
        "unique-images", 3, 2)
    figures = [k for k in unique if k not in ("protocol", "listed_lines", "unique_images")]
    assert {k: unique[k] for k in figures} == {k: once[k] for k in figures}


def test_process_model_outputs_shift_and_tensors():
    ev = OpenWorldEvaluator(split=SPLIT, task=1, records=OPEN_RECORDS, coco=False)
    ev.reset()
    # A model box is 0-based: [0, 0, 9, 9] is the VOC box [1, 1, 10, 10] = box(1, 1).
    ev.process([{"image_id": "i0"}], [{"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]),
                                       "labels": torch.tensor([A]),
                                       "scores": torch.tensor([0.9])}])
    ev.process([{"image_id": "i1"}], [{"boxes": np.array([[0.0, 0.0, 9.0, 9.0]]),
                                       "labels": np.array([A]), "scores": np.array([0.8])}])
    # A repeated image is ignored, not double-counted.
    ev.process([{"image_id": "i1"}], [{"boxes": np.array([[0.0, 0.0, 9.0, 9.0]]),
                                       "labels": np.array([A]), "scores": np.array([0.8])}])
    r = ev.evaluate()
    assert list(r) == list(RESULT_KEYS) and r["coco"] is None
    assert r["per_class_ap"]["a"] == pytest.approx(100.0)
    ev.reset()
    assert ev.evaluate()["per_class_ap"]["a"] == 0.0
    with pytest.raises(OreError, match="nope"):
        ev.process([{"image_id": "nope"}], [{"boxes": [], "labels": [], "scores": []}])


def test_unseen_class_detections_dropped_and_task2_groups():
    records = [record("i0", [("a", box(1, 1)), ("c", box(51, 51)), ("z", box(101, 101))])]
    dets = [("i0", A, 0.9, box(1, 1)), ("i0", C, 0.8, box(51, 51)),
            ("i0", UNK, 0.7, box(101, 101))]
    r1 = evaluate(records, dets, task=1)  # the c detection is ignored in task 1
    assert r1["per_class_ap"]["a"] == pytest.approx(100.0)
    assert r1["per_class_ap"]["b"] is None  # no object of b: AP undefined
    assert r1["per_class_ap"]["unknown"] == pytest.approx(50.0)
    assert r1["a_ose"] == 0 and r1["unknown_recall"] == pytest.approx(50.0)
    r2 = evaluate(records, dets, task=2)
    assert r2["known_mAP_prev"] == pytest.approx(100.0)  # a (b has no object: left out)
    assert r2["known_mAP_current"] == pytest.approx(100.0)  # c
    assert r2["per_class_ap"]["b"] is None
    assert r2["unknown_recall"] == pytest.approx(100.0)


def test_result_is_strict_json():
    r = evaluate(OPEN_RECORDS, OPEN_DETS, coco=True, details=False)
    assert list(r) == list(RESULT_KEYS)
    json.dumps(r, allow_nan=False)
    r = evaluate([record("i0", [])], [], coco=True, details=False)  # nothing at all
    json.dumps(r, allow_nan=False)
    assert r["coco"] is None and r["known_mAP_both"] is None and r["unknown_recall"] is None


def test_bad_arguments():
    with pytest.raises(OreError, match="AP method"):
        OpenWorldEvaluator(split=SPLIT, task=1, records=[], ap="voc12")
    with pytest.raises(OreError, match="task"):
        OpenWorldEvaluator(split=SPLIT, task=3, records=[])
    ev = OpenWorldEvaluator(split=SPLIT, task=1, records=AP_RECORDS, coco=False)
    ev.add_detections(["i0"], np.array([0]), np.array([0.5]), np.array([box(1, 1)], float))
    with pytest.raises(ValueError, match="labels"):
        ev.evaluate()


# ----------------------------------------------------------------- pycocotools


def test_agrees_with_pycocotools_ap50_without_unknowns():
    """Without unknowns, difficult objects or ambiguous overlaps, VOC and COCO match the
    same detections, so AP50 differs only by interpolation: COCO averages the precision
    envelope p(r) sampled at r = 0, 0.01, …, 1 (101 points), we integrate it exactly.
    p is non-increasing, so ∫ p lies between (S − p(0))/100 and (S − p(1))/100 with
    S = Σ p(k/100), while COCO gives S/101: the two differ by at most 0.01 (1 point)."""
    rng = np.random.default_rng(3)
    records, dets = [], []
    for i in range(30):
        objects = []
        for k in range(rng.integers(1, 5)):  # objects on a grid: never two on one box
            name = "a" if rng.random() < 0.5 else "b"
            objects.append((name, box(1 + 60 * k, 1 + 60 * (i % 3), 40)))
        records.append(record(f"i{i}", objects))
        for name, b, _ in [(*o, False) for o in objects]:
            if rng.random() < 0.75:  # a slightly shifted hit, IoU well above 0.5
                shift = rng.integers(-4, 5, 2)
                dets.append((f"i{i}", SPLIT.label(name), float(rng.random()),
                             [b[0] + shift[0], b[1] + shift[1], b[2] + shift[0], b[3] + shift[1]]))
        for _ in range(rng.integers(0, 3)):  # misses far from every object
            dets.append((f"i{i}", int(rng.integers(1, 3)), float(rng.random()),
                         box(300 + int(rng.integers(0, 100)), 300, 30)))
    r = evaluate(records, dets, coco=True)
    assert r["coco"]["AP50"] == pytest.approx(r["known_mAP_both"], abs=1.0)
    assert r["known_mAP_both"] != r["coco"]["AP50"]  # the interpolations do differ here
    assert 0 <= r["coco"]["AP75"] <= r["coco"]["AP50"]


# ----------------------------------------------- naive oracle, order, invariants

GRID = [1, 11, 21, 41]  # box corners on a coarse grid make overlaps, ties and exact hits


@st.composite
def worlds(draw):
    n_img = draw(st.integers(1, 3))
    names = ("a", "b", "c", "z")
    records = []
    for i in range(n_img):
        objs = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(GRID),
                                       st.sampled_from(GRID), st.sampled_from([10, 20]),
                                       st.booleans()), max_size=5))
        records.append(record(f"i{i}", [(n, box(x, y, s), d and s == 10)
                                        for n, x, y, s, d in objs]))
    dets = draw(st.lists(st.tuples(st.integers(0, n_img - 1), st.sampled_from([A, B, UNK]),
                                   st.sampled_from([0.2, 0.5, 0.7, 0.9]),
                                   st.sampled_from(GRID), st.sampled_from(GRID),
                                   st.sampled_from([10, 12, 20])), max_size=20))
    return records, [(f"i{i}", lab, sc, box(x, y, s)) for i, lab, sc, x, y, s in dets]


def _arrays(records, dets, task=1, ap="allpoint"):
    ev = OpenWorldEvaluator(split=SPLIT, task=task, records=records, ap=ap, coco=False)
    if dets:
        ids, labels, scores, boxes = zip(*dets)
        ev.add_detections(list(ids), np.array(labels), np.array(scores), np.array(boxes, float))
    return ev


SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(worlds(), st.sampled_from(["allpoint", "11point"]), st.sampled_from([1, 3, 1 << 16]))
def test_vectorised_equals_naive_oracle(world, ap, chunk):
    ev = _arrays(*world, ap=ap)
    dets = ev.evaluable_detections()
    saved, metrics._CHUNK = metrics._CHUNK, chunk  # small chunks: exercise the boundaries
    try:
        fast = open_world_metrics(ev.gt, dets, ev.protocol)
    finally:
        metrics._CHUNK = saved
    slow = naive_metrics(ev.gt, dets, ev.protocol)
    assert fast == slow  # bit for bit


@SETTINGS
@given(worlds(), st.randoms(use_true_random=False))
def test_invariant_to_detection_order(world, random):
    records, dets = world
    shuffled = list(dets)
    random.shuffle(shuffled)
    assert evaluate(records, shuffled) == evaluate(records, dets)


@SETTINGS
@given(worlds(), st.data())
def test_adding_a_true_positive_never_lowers_recall(world, data):
    records, dets = world
    targets = [(r.image_id, n, b) for r in records
               for n, b, d in zip(r.names, r.boxes.tolist(), r.difficult) if not d]
    if not targets:
        return
    image_id, name, b = data.draw(st.sampled_from(targets))
    label = {"a": A, "b": B}.get(name, UNK)
    score = data.draw(st.sampled_from([0.1, 0.5, 0.9, 0.95]))
    before = evaluate(records, dets)
    after = evaluate(records, dets + [(image_id, label, score, b)])
    key = "unknown" if label == UNK else name
    assert after["per_class_recall"][key] >= before["per_class_recall"][key]


@SETTINGS
@given(worlds(), st.sampled_from(["allpoint", "11point"]))
def test_figures_in_range(world, ap):
    r = evaluate(*world, ap=ap)
    for name in r["per_class_ap"]:
        for key in ("per_class_ap", "per_class_recall", "per_class_precision"):
            v = r[key][name]
            assert v is None or 0.0 <= v <= 100.0
    for key in ("known_mAP_current", "known_mAP_both", "unknown_recall", "unknown_ap",
                "unknown_precision", "udr", "udp"):
        assert r[key] is None or 0.0 <= r[key] <= 100.0
    assert r["a_ose"] >= 0
    assert set(DETAIL_KEYS) <= set(r)
