"""Columnar (.npz) detections files: the JSON form's arrays and figures, exactly, and the
JSON form's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ore.data.classes import UNKNOWN, load_task_split
from ore.data.records import as_listed, load_role_split
from ore.errors import OreError
from ore.evaluation.detections import read_detections, write_columnar_detections
from ore.evaluation.evaluator import OpenWorldEvaluator

TOY = load_task_split("toy")
TASK = 2


def _entries(records, rng, n=600):
    """Detections near the objects (any seen class or unknown) and in the background, with
    class names in the spellings a file may use and scores with ties."""
    seen = list(TOY.seen(TASK))
    names = seen + [UNKNOWN, "Circle", " square "]
    out = []
    for _ in range(n):
        r = records[int(rng.integers(len(records)))]
        if len(r.boxes) and rng.random() < 0.7:
            box = r.boxes[int(rng.integers(len(r.boxes)))] + rng.normal(0, 2, 4)
        else:
            xy = rng.uniform(1, 100, 2)
            box = np.concatenate([xy, xy + rng.uniform(1, 60, 2)])
        box = [float(v) for v in np.round(box, 1)]
        box[2], box[3] = max(box[0], box[2]), max(box[1], box[3])
        out.append({"image_id": r.image_id, "category": names[int(rng.integers(len(names)))],
                    "score": float(np.round(rng.random(), 2)), "bbox": box})
    return out


def _write_npz(path, entries):
    return write_columnar_detections(path, [e["image_id"] for e in entries],
                                     [e["category"] for e in entries],
                                     [e["score"] for e in entries], [e["bbox"] for e in entries])


def _evaluate(records, dets):
    ev = OpenWorldEvaluator(split=TOY, task=TASK, records=records, coco=False)
    ev.add_detections(**dets)
    return ev.evaluate(details=True)


def test_columnar_file_gives_the_json_results_exactly(toy_root, tmp_path):
    records = load_role_split(toy_root, "all_task_test", TOY, TASK, "test")
    listed = as_listed(records, toy_root, "all_task_test")
    entries = _entries(records, np.random.default_rng(0))
    (tmp_path / "d.json").write_text(json.dumps(entries))
    from_json = read_detections(tmp_path / "d.json", TOY)
    from_npz = read_detections(_write_npz(tmp_path / "d.npz", entries), TOY)
    assert from_npz["image_ids"] == from_json["image_ids"]
    for key in ("labels", "scores", "boxes"):
        assert from_npz[key].dtype == from_json[key].dtype
        np.testing.assert_array_equal(from_npz[key], from_json[key])
    result = _evaluate(listed, from_json)
    assert result["unknown_recall"] is not None and result["a_ose"] > 0
    assert _evaluate(listed, from_npz) == result
    # An upper-case suffix is columnar too; an empty file is no detections.
    (tmp_path / "d.npz").rename(tmp_path / "D.NPZ")
    assert read_detections(tmp_path / "D.NPZ", TOY)["image_ids"] == from_json["image_ids"]
    empty = read_detections(_write_npz(tmp_path / "e.npz", []), TOY)
    assert empty["image_ids"] == [] and empty["boxes"].shape == (0, 4)


GOOD = [{"image_id": "img0", "category": "circle", "score": 0.9, "bbox": [1, 1, 20, 20]},
        {"image_id": "img1", "category": "unknown", "score": 0.5, "bbox": [2, 2, 9, 9]}]


@pytest.mark.parametrize("change, message", [
    ({"category": "blob"}, "entry #1: category 'blob' is in no task of split toy"),
    ({"score": float("nan")}, "entry #1: score must be a finite number, got nan"),
    ({"bbox": [1, 1, float("inf"), 2]}, "entry #1: bbox must be 4 finite numbers"),
    ({"bbox": [5, 1, 2, 2]}, "entry #1: bbox [5.0, 1.0, 2.0, 2.0] has xmax < xmin"),
    ({"image_id": ""}, "entry #1: image_id must be a non-empty string, got ''"),
])
def test_bad_detection_is_named_as_in_json(tmp_path, change, message):
    entries = [GOOD[0], {**GOOD[1], **change}]
    path = _write_npz(tmp_path / "d.npz", entries)
    with pytest.raises(OreError) as exc:
        read_detections(path, TOY)
    assert str(exc.value).startswith(f"{path}: {message}")
    assert "\n" not in str(exc.value)
    # The JSON form names the same entry.
    (tmp_path / "d.json").write_text(json.dumps(entries))
    with pytest.raises(OreError, match="entry #1"):
        read_detections(tmp_path / "d.json", TOY)


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_malformed_columnar_files(tmp_path):
    path = _write_npz(tmp_path / "d.npz", GOOD)
    arrays = _arrays(path)
    bad = tmp_path / "bad.npz"

    def error(**change):
        np.savez(bad, **{k: v for k, v in {**arrays, **change}.items() if v is not None})
        with pytest.raises(OreError) as exc:
            read_detections(bad, TOY)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "no array 'scores'" in error(scores=None)
    assert "entry #0: images is 7, not an index into image_ids (0..1)" in error(
        images=np.array([7, 0]))
    assert "entry #1: labels is -1" in error(labels=np.array([0, -1]))
    assert "array 'boxes' is" in error(boxes=np.zeros(8))
    assert "got 2, 2, 2 and [3, 4]" in error(boxes=np.zeros((3, 4)))
    assert "array 'image_ids' is" in error(image_ids=np.array([1, 2]))
    assert "not a columnar detections .npz" in error(
        image_ids=np.array(["img0", None], dtype=object))  # pickled objects are refused
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(OreError, match="not a columnar detections .npz"):
        read_detections(bad, TOY)
    with open(bad, "wb") as f:  # a single .npy array under an .npz name
        np.save(f, np.zeros(3))
    with pytest.raises(OreError, match="holds one array"):
        read_detections(bad, TOY)
