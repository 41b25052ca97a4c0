"""``ore eval-detections`` end to end on a small VOC-layout folder written here."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest

from ore.cli import main
from ore.data.classes import load_task_split
from ore.errors import OreError
from ore.evaluation.detections import parse_detections, write_columnar_detections
from ore.evaluation.evaluator import RESULT_KEYS
from ore.evaluation.report import format_table

# The toy split: task 1 = circle square triangle cross star; spiral is never introduced.
OBJECTS = {
    "img0": [("circle", [1, 1, 20, 20], 0), ("square", [41, 41, 60, 60], 0),
             ("spiral", [101, 101, 130, 130], 0)],
    "img1": [("circle", [1, 1, 20, 20], 1), ("ring", [51, 1, 80, 30], 0)],  # ring: task 2
    "img2": [],
}


def _xml(name, objects):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    return (f"<annotation><filename>{name}.jpg</filename><size><width>160</width>"
            f"<height>160</height><depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "toyvoc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for name, objects in OBJECTS.items():
        (root / "Annotations" / f"{name}.xml").write_text(_xml(name, objects))
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.zeros((160, 160, 3), np.uint8))
    # The public test list repeats ids (img0 here): every line counts by default.
    (root / "ImageSets/Main/test.txt").write_text("img0\nimg1\nimg2\nimg0\n")
    return root


DETECTIONS = [
    {"image_id": "img0", "category": "circle", "score": 0.9, "bbox": [1, 1, 20, 20]},
    {"image_id": "img0", "category": "square", "score": 0.8, "bbox": [101, 101, 130, 130]},
    {"image_id": "img0", "category": "unknown", "score": 0.7, "bbox": [101, 101, 129, 130]},
    {"image_id": "img1", "category": "unknown", "score": 0.6, "bbox": [51, 1, 80, 30]},
    {"image_id": "img1", "category": "circle", "score": 0.5, "bbox": [1, 1, 20, 20]},
    {"image_id": "img2", "category": "star", "score": 0.4, "bbox": [5, 5, 15, 15]},
]


def _run(voc_root, tmp_path, detections, *extra):
    det_path = tmp_path / "dets.json"
    det_path.write_text(json.dumps(detections))
    out = tmp_path / "out" / "metrics.json"
    argv = ["eval-detections", "--root", str(voc_root), "--split", "test", "--task", "t1",
            "--classes", "toy", "--detections", str(det_path), "--output", str(out), *extra]
    return main(argv), out


def test_eval_detections_end_to_end(voc_root, tmp_path, capsys):
    code, out = _run(voc_root, tmp_path, DETECTIONS, "--unique-images")
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result) == list(RESULT_KEYS)
    assert (result["protocol"], result["listed_lines"], result["unique_images"]) == (
        "unique-images", 4, 3)
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left
    # circle: one positive (img1's is difficult; its detection is ignored) → AP 100.
    assert result["per_class_ap"]["circle"] == pytest.approx(100.0)
    assert result["per_class_ap"]["square"] == pytest.approx(0.0)
    assert result["per_class_ap"]["triangle"] is None  # no object of that class
    # Unknown objects in task 1: spiral (img0) and ring (img1); both found.
    assert result["unknown_recall"] == pytest.approx(100.0)
    assert result["a_ose"] == 1  # the square detection sits on the spiral
    assert result["udr"] == pytest.approx(100.0) and result["udp"] == pytest.approx(100.0)
    assert result["known_mAP_prev"] is None
    assert set(result["coco"]) == {"AP", "AP50", "AP75"}
    printed = capsys.readouterr().out
    assert "U-Recall" in printed and "A-OSE" in printed and "circle" in printed
    assert "protocol unique-images: 4 listed lines, 3 unique images" in printed


def test_eval_detections_counts_listed_lines_by_default(voc_root, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO):
        code, out = _run(voc_root, tmp_path, DETECTIONS)
    assert code == 0
    assert "test: 4 lines, 3 unique images; repeats are counted" in caplog.text
    result = json.loads(out.read_text())
    assert (result["protocol"], result["listed_lines"], result["unique_images"]) == (
        "listed-lines", 4, 3)
    # img0 is listed twice: its circle counts twice (2 positives), and the second copy of
    # its detection finds the circle claimed → TP then FP: recall 1/2, AP 50.
    assert result["per_class_ap"]["circle"] == pytest.approx(50.0)
    # Unknowns: spiral ×2 (img0) + ring (img1) = 3; the spiral can be claimed once.
    assert result["unknown_recall"] == pytest.approx(100 * 2 / 3)
    assert result["a_ose"] == 2  # the square detection on the spiral, once per line
    assert "protocol listed-lines: 4 listed lines, 3 unique images" in capsys.readouterr().out


def test_task_number_forms_and_11point(voc_root, tmp_path):
    code, out = _run(voc_root, tmp_path, DETECTIONS, "--ap", "11point", "--no-coco")
    assert code == 0
    first = json.loads(out.read_text())
    assert first["coco"] is None
    det_path = tmp_path / "dets.json"
    argv = ["eval-detections", "--root", str(voc_root), "--split", "test", "--task", "1",
            "--classes", "toy", "--detections", str(det_path), "--output", str(out),
            "--ap", "11point", "--no-coco"]
    assert main(argv) == 0
    assert json.loads(out.read_text()) == first



def test_columnar_detections_file_gives_the_same_figures(voc_root, tmp_path):
    code, out = _run(voc_root, tmp_path, DETECTIONS, "--no-coco")
    assert code == 0
    from_json = json.loads(out.read_text())
    npz = write_columnar_detections(
        tmp_path / "dets.npz", [d["image_id"] for d in DETECTIONS],
        [d["category"] for d in DETECTIONS], [d["score"] for d in DETECTIONS],
        [d["bbox"] for d in DETECTIONS])
    argv = ["eval-detections", "--root", str(voc_root), "--split", "test", "--task", "t1",
            "--classes", "toy", "--detections", str(npz), "--output", str(out), "--no-coco"]
    assert main(argv) == 0
    assert json.loads(out.read_text()) == from_json

@pytest.mark.parametrize("entry, message", [
    ({"image_id": "img0", "category": "circle", "score": 0.5}, "entry #1"),
    ({"image_id": "img0", "category": "blob", "score": 0.5, "bbox": [1, 1, 2, 2]}, "blob"),
    ({"image_id": "img0", "category": "circle", "score": "high", "bbox": [1, 1, 2, 2]},
     "score"),
    ({"image_id": "img0", "category": "circle", "score": 0.5, "bbox": [5, 1, 2, 2]}, "xmax"),
    ({"image_id": "img0", "category": "circle", "score": 0.5, "bbox": [1, 1, 2]}, "bbox"),
    ({"image_id": "nowhere", "category": "circle", "score": 0.5, "bbox": [1, 1, 2, 2]},
     "nowhere"),
])
def test_malformed_entries_are_one_line_errors(voc_root, tmp_path, capsys, entry, message):
    code, out = _run(voc_root, tmp_path, [DETECTIONS[0], entry])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_bad_task_and_missing_file(voc_root, tmp_path, capsys):
    argv = ["eval-detections", "--root", str(voc_root), "--split", "test", "--task", "t9",
            "--classes", "toy", "--detections", str(tmp_path / "missing.json")]
    assert main(argv) == 2
    assert "task" in capsys.readouterr().err
    argv[argv.index("t9")] = "t1"
    assert main(argv) == 2
    assert "not found" in capsys.readouterr().err


def test_parse_detections_canonicalises_names_and_rejects_non_lists():
    split = load_task_split("owod")
    parsed = parse_detections(
        [{"image_id": "x", "category": "Potted Plant", "score": 1, "bbox": [1, 2, 3, 4]}], split)
    assert parsed["labels"].tolist() == [split.label("pottedplant")]
    assert parsed["boxes"].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    with pytest.raises(OreError, match="JSON list"):
        parse_detections({"image_id": "x"}, split)
    with pytest.raises(OreError, match="entry #0"):
        parse_detections([{"image_id": "x", "category": "car", "score": float("nan"),
                           "bbox": [1, 2, 3, 4]}], split)


def test_format_table_handles_missing_values():
    result = {k: None for k in RESULT_KEYS}
    result.update(per_class_ap={"a": None, "unknown": 12.5}, a_ose=0,
                  wilderness_impact={"0.8": None})
    text = format_table(result, title="t")
    assert "A-OSE" in text and "12.50" in text


def test_fast_and_checking_parsers_agree():
    from ore.evaluation.detections import _parse_checking_each

    split = load_task_split("toy")
    entries = [dict(e) for e in DETECTIONS] + [
        {"image_id": "img2", "category": "Circle", "score": 1, "bbox": [1, 2.5, 3, 4]}]
    fast = parse_detections(entries, split)
    slow = _parse_checking_each(entries, split, "x")
    assert fast["image_ids"] == slow["image_ids"]
    for key in ("labels", "scores", "boxes"):
        np.testing.assert_array_equal(fast[key], slow[key])
    with pytest.raises(OreError, match="entry #7: score"):
        parse_detections(entries + [{**entries[0], "score": True}], split)
