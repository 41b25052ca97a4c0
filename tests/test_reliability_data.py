"""Annotations that disagree with their images, or hold numbers that are not numbers, are
noticed: a warning and a count, or a one-line error."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from ore.cli import main
from ore.data.classes import load_task_split
from ore.data.dataset import DetectionDataset
from ore.data.records import load_role_split
from ore.engine.metrics_log import read_metrics
from tests.reliability import train_args, user_error


@pytest.fixture
def world(toy_root, tmp_path) -> Path:
    return Path(shutil.copytree(toy_root, tmp_path / "world"))


def test_an_image_of_another_size_than_its_annotation_is_warned_counted_and_clipped(
        caplog, tmp_path, world):
    ids = (world / "ImageSets" / "Main" / "t1_train.txt").read_text().split()
    for image_id in ids:  # every annotation claims twice the real size
        xml = world / "Annotations" / f"{image_id}.xml"
        text = xml.read_text()
        w, h = (int(re.search(f"<{k}>(\\d+)</{k}>", text).group(1)) for k in ("width", "height"))
        text = text.replace(f"<width>{w}</width>", f"<width>{2 * w}</width>")
        text = text.replace(f"<height>{h}</height>", f"<height>{2 * h}</height>")
        if image_id == ids[0]:  # one box across the real right edge, one beyond it
            first = (w, h)
            text = text.replace("</annotation>", (
                f"<object><name>circle</name><bndbox><xmin>{w - 9}</xmin><ymin>1</ymin>"
                f"<xmax>{w + 40}</xmax><ymax>10</ymax></bndbox></object>"
                f"<object><name>circle</name><bndbox><xmin>{w + 10}</xmin><ymin>1</ymin>"
                f"<xmax>{w + 40}</xmax><ymax>10</ymax></bndbox></object></annotation>"))
        xml.write_text(text)
    split = load_task_split("toy")
    records = load_role_split(world, "t1_train", split, 1, "train")
    n_objects = len(records[0].names)
    _, target, meta = DetectionDataset(records[:1], split)[0]
    assert meta["size_mismatch"] and meta["decoded_size"] == (first[1], first[0])
    boxes = target["boxes"].numpy()
    assert len(boxes) == len(target["labels"]) == n_objects - 1  # the one beyond is dropped
    assert (boxes[:, 2] <= first[0]).all() and (boxes[:, 3] <= first[1]).all()
    assert boxes[:, 2].max() == first[0]  # the one across the edge ends at it
    # In training: one warning per image and a size_mismatch count in metrics.jsonl.
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main([str(a) for a in train_args(out, world, "SOLVER.LOG_PERIOD=1",
                                                "SOLVER.MAX_ITER=3")]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["size_mismatch"] >= rows[0]["size_mismatch"] >= 1
    warned = [r.getMessage() for r in caplog.records if "its annotation says" in r.getMessage()]
    assert len(warned) == len(set(warned)) == rows[-1]["size_mismatch"]


@pytest.mark.parametrize("bbox", [[1.0, 2.0, float("nan"), 5.0], [1.0, 2.0, 1e39, 5.0]])
def test_a_coco_bbox_that_is_not_finite_is_refused(capsys, world, bbox):
    path = world / "annotations" / "t1_train.json"
    data = json.loads(path.read_text())
    ann = data["annotations"][3]
    ann["bbox"] = bbox
    path.write_text(json.dumps(data))  # NaN is written as the bare word NaN
    image = next(i for i in data["images"] if i["id"] == ann["image_id"])["file_name"]
    msg = user_error(capsys, ["dataset-stats", "--root", world, "--split", "t1_train",
                              "--classes", "toy", "--format", "coco"])
    assert msg == (f"error: {path}: annotation {ann['id']} of image {image}: bbox {bbox} is "
                   "not 4 finite numbers [x, y, width, height]")
