"""One test per row of the README's "Bad input" table: each user mistake ends with exactly
one ``error:`` line, exit status 2, no traceback, and no file written half-way."""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil

import pytest
import torch
import yaml

from ore.cli import main
from ore.data.classes import TOY_NEVER_INTRODUCED, TOY_TASKS
from ore.engine.layout import FINAL
from ore.engine.metrics_log import read_metrics
from tests.reliability import user_error

FAST = ["DATALOADER.NUM_WORKERS=0", "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=2",
        "SOLVER.WARMUP_ITERS=0", "INPUT.MIN_SIZE_TRAIN=[64,64]", "INPUT.MAX_SIZE_TRAIN=96"]


@pytest.fixture
def world(toy_root, tmp_path) -> pathlib.Path:
    """A private copy of the toy world that a test may break."""
    return pathlib.Path(shutil.copytree(toy_root, tmp_path / "world"))


def first_ids(root: pathlib.Path, n: int = 1, split: str = "t1_train") -> list[str]:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:n]


def train(out: pathlib.Path, root: pathlib.Path | str, *extra: str) -> list[str]:
    return ["train", "--config", "toy/t1_train.yaml", "--output", out,
            f"DATASETS.ROOT={root}", *FAST, *extra]


def nothing_written(out: pathlib.Path) -> bool:
    return not out.exists()


# --- configuration ----------------------------------------------------------------------

def test_nonexistent_config(capsys, tmp_path):
    msg = user_error(capsys, ["train", "--config", "nope/t9.yaml", "--output", tmp_path / "o"])
    assert msg == "error: config file not found: nope/t9.yaml"
    assert nothing_written(tmp_path / "o")


def test_mistyped_key_names_the_closest(capsys, tmp_path, toy_root):
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, toy_root, "SOLVER.BASE_LRR=0.1"))
    assert "unknown key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR?" in msg
    assert nothing_written(out)


def test_unknown_key_in_a_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("_BASE_: toy/t1_train.yaml\nSOLVER:\n  MAX_ITERS: 5\n")
    msg = user_error(capsys, ["config", "show", cfg])
    assert f"{cfg}: unknown key SOLVER.MAX_ITERS; did you mean SOLVER.MAX_ITER?" in msg


def test_value_of_the_wrong_type(capsys, tmp_path, toy_root):
    msg = user_error(capsys, train(tmp_path / "o", toy_root, "SOLVER.MAX_ITER=many"))
    assert "key SOLVER.MAX_ITER: value 'many' is not of the expected type int" in msg


def test_config_that_is_not_yaml(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("SOLVER: [1, 2\n")
    assert "not valid YAML" in user_error(capsys, ["config", "show", cfg])


def test_bad_amp_mode_and_fp16_on_cpu(capsys, tmp_path, toy_root):
    msg = user_error(capsys, train(tmp_path / "o", toy_root, "SOLVER.AMP=fp32"))
    assert "SOLVER.AMP: 'fp32'; expected one of ['bf16', 'fp16', 'off']" in msg
    msg = user_error(capsys, train(tmp_path / "o", toy_root, "SOLVER.AMP=fp16"))
    assert "SOLVER.AMP: fp16 needs a CUDA device" in msg
    assert nothing_written(tmp_path / "o")


def test_cuda_requested_without_cuda(capsys, tmp_path, toy_root):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    msg = user_error(capsys, train(tmp_path / "o", toy_root, "DEVICE=cuda"))
    assert msg == "error: DEVICE: 'cuda' requested but CUDA is not available"


# --- dataset ------------------------------------------------------------------------------

def test_missing_dataset_root(capsys, tmp_path):
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, tmp_path / "no-such-root"))
    assert msg == f"error: dataset root not found: {tmp_path / 'no-such-root'}"
    assert nothing_written(out)


def test_missing_image_list(capsys, tmp_path, toy_root):
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, toy_root, "DATASETS.TRAIN=t9_train"))
    assert msg.startswith("error: image list not found: ") and msg.endswith("t9_train.txt")
    assert nothing_written(out)


def test_missing_image(capsys, tmp_path, world):
    (image_id,) = first_ids(world)
    (world / "JPEGImages" / f"{image_id}.jpg").unlink()
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, world))
    assert f"image for listed id {image_id!r} not found" in msg
    assert nothing_written(out)


def test_corrupt_jpeg_stops_with_the_file_name(capsys, tmp_path, world):
    for image_id in first_ids(world, 1000):
        (world / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, world))
    assert "cannot read image" in msg and "DATALOADER.SKIP_BAD_IMAGES=true" in msg
    assert not (out / FINAL).exists() and not list(out.glob(".*"))


def test_corrupt_jpeg_skipped_with_a_count(capsys, caplog, tmp_path, world):
    for image_id in first_ids(world, 1000)[::2]:
        (world / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"garbage")
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING):
        rc = main([str(a) for a in train(out, world, "SOLVER.MAX_ITER=4", "SOLVER.LOG_PERIOD=4",
                                         "DATALOADER.SKIP_BAD_IMAGES=true")])
    assert rc == 0 and (out / FINAL).is_file()
    assert read_metrics(out / "metrics.jsonl")[-1]["bad_images"] > 0
    assert any("skipping unreadable image" in r.getMessage() for r in caplog.records)


def test_malformed_xml(capsys, tmp_path, world):
    (image_id,) = first_ids(world)
    (world / "Annotations" / f"{image_id}.xml").write_text("<annotation><object><name>")
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, world))
    assert f"{image_id}.xml: malformed XML" in msg
    assert nothing_written(out)


def test_malformed_coco_json(capsys, tmp_path, world):
    (world / "annotations" / "t1_train.json").write_text('{"images": [')
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, world, "DATASETS.FORMAT=coco"))
    assert "t1_train.json: not a COCO instances file (JSONDecodeError" in msg
    assert nothing_written(out)


def test_malformed_detections_json(capsys, tmp_path, toy_root):
    dets = tmp_path / "dets.json"
    dets.write_text('[{"image_id": "000001", "category": "circle", "score": 0.5, "bbox": [1, 2')
    msg = user_error(capsys, ["eval-detections", "--root", toy_root, "--split", "all_task_test",
                              "--task", "t1", "--classes", "toy", "--detections", dets,
                              "--no-coco", "--output", tmp_path / "m.json"])
    assert f"{dets}: not valid JSON" in msg
    assert not (tmp_path / "m.json").exists()


def test_degenerate_and_out_of_image_boxes_are_counted(capsys, caplog, world):
    (image_id,) = first_ids(world)
    xml = world / "Annotations" / f"{image_id}.xml"
    text = xml.read_text()
    # One box past the right edge (clipped), one with xmax < xmin (dropped).
    extra = ("<object><name>circle</name><bndbox><xmin>5</xmin><ymin>5</ymin>"
             "<xmax>99999</xmax><ymax>20</ymax></bndbox></object>"
             "<object><name>circle</name><bndbox><xmin>50</xmin><ymin>5</ymin>"
             "<xmax>10</xmax><ymax>20</ymax></bndbox></object>")
    xml.write_text(text.replace("</annotation>", extra + "</annotation>"))
    with caplog.at_level(logging.WARNING):
        rc = main(["dataset-stats", "--root", str(world), "--split", "t1_train", "--task", "t1",
                   "--role", "train", "--classes", "toy", "--json"])
    assert rc == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 boxes extended past the image and were clipped" in m for m in messages)
    assert any("1 degenerate boxes" in m and "dropped" in m for m in messages)


def test_class_in_no_task(capsys, tmp_path, world):
    (image_id,) = first_ids(world)
    xml = world / "Annotations" / f"{image_id}.xml"
    xml.write_text(re.sub(r"<name>[^<]*</name>", "<name>dragon</name>", xml.read_text(), count=1))
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, world))
    assert "class 'dragon' is in no task of split toy" in msg
    assert nothing_written(out)


def test_split_empty_after_filtering(capsys, tmp_path, toy_root):
    classes = tmp_path / "ghost.yaml"
    classes.write_text(yaml.safe_dump({
        "tasks": [["ghost"], [c for task in TOY_TASKS for c in task]],
        "never_introduced": list(TOY_NEVER_INTRODUCED),
    }))
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, toy_root, f"DATASETS.CLASSES={classes}"))
    assert "has no image with a target after 'train' filtering for task 1" in msg
    assert nothing_written(out)


# --- weights and checkpoints --------------------------------------------------------------

def test_checkpoint_for_another_class_layout(capsys, tmp_path, toy_root):
    ckpt = tmp_path / "other.pth"
    torch.save({"model": {}, "meta": {"classes": ["aeroplane", "bicycle", "bird"]}}, ckpt)
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, toy_root, f"MODEL.WEIGHTS={ckpt}"))
    assert "checkpoint was trained for a different class layout" in msg
    assert nothing_written(out)
    image = next((toy_root / "JPEGImages").glob("*.jpg"))
    msg = user_error(capsys, ["detect", "--config", "toy/t1_train.yaml", "--weights", ckpt,
                              image, "--output", tmp_path / "det"])
    assert "different class layout" in msg and nothing_written(tmp_path / "det")


@pytest.mark.parametrize("content, expected", [
    (b"this is text, not a torch file", "not a readable checkpoint"),
    ([1, 2, 3], "not an ORE detector checkpoint (no 'model' state dict)"),
])
def test_weights_file_that_is_not_a_state_dict(capsys, tmp_path, toy_root, content, expected):
    weights = tmp_path / "w.pth"
    if isinstance(content, bytes):
        weights.write_bytes(content)
    else:
        torch.save(content, weights)
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, toy_root, f"MODEL.WEIGHTS={weights}"))
    assert expected in msg
    assert nothing_written(out)


def test_backbone_weights_that_are_not_a_state_dict(capsys, tmp_path, toy_root):
    weights = tmp_path / "trunk.pth"
    torch.save({"conv1.weight": "not a tensor"}, weights)
    msg = user_error(capsys, train(tmp_path / "o", toy_root, f"MODEL.BACKBONE.WEIGHTS={weights}"))
    assert f"MODEL.BACKBONE.WEIGHTS: {weights} is not a state dict of tensors" in msg


def test_missing_weights_file(capsys, tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(b"")
    msg = user_error(capsys, ["detect", "--config", "toy/t1_train.yaml", "--weights",
                              tmp_path / "none.pth", image, "--output", tmp_path / "det"])
    assert msg == f"error: weights file not found: {tmp_path / 'none.pth'}"


def test_nan_loss_names_the_iteration_and_keeps_the_last_checkpoint(capsys, tmp_path, toy_root):
    out = tmp_path / "o"
    msg = user_error(capsys, train(out, toy_root, "SOLVER.BASE_LR=1e30", "SOLVER.MAX_ITER=20",
                                   "SOLVER.CHECKPOINT_PERIOD=1"))
    assert "loss became" in msg and "at iteration" in msg and "stopped" in msg
    iteration = int(msg.split("at iteration ")[1].split(";")[0])
    assert iteration >= 2 and not (out / FINAL).exists()
    good = out / f"model_{iteration - 1:07d}.pth"
    assert f"Last good checkpoint: {good}" in msg
    assert torch.load(good, weights_only=True)["iteration"] == iteration - 1


# --- security: user files cannot run code or reach outside the dataset --------------------

class _Payload:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (pathlib.Path.touch, (self.marker,))


def test_weights_with_a_pickled_payload_are_refused(capsys, tmp_path, toy_root):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    torch.save({"model": _Payload(marker)}, weights)
    msg = user_error(capsys, train(tmp_path / "o", toy_root, f"MODEL.WEIGHTS={weights}"))
    assert "not a readable checkpoint (UnpicklingError)" in msg
    assert not marker.exists()


def test_config_with_a_python_tag_is_refused(capsys, tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"SOLVER: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    assert "not valid YAML" in user_error(capsys, ["config", "show", cfg])
    assert not marker.exists()


def test_list_ids_cannot_escape_the_root(capsys, tmp_path, world):
    (world / "ImageSets" / "Main" / "t1_train.txt").write_text("000001\n../../../etc/passwd\n")
    msg = user_error(capsys, train(tmp_path / "o", world))
    assert "t1_train.txt:2: image id '../../../etc/passwd' is not a plain file stem" in msg


def test_coco_file_names_cannot_escape_the_image_folder(capsys, tmp_path, world):
    path = world / "annotations" / "t1_train.json"
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = "../../outside.jpg"
    path.write_text(json.dumps(data))
    msg = user_error(capsys, train(tmp_path / "o", world, "DATASETS.FORMAT=coco"))
    assert "file_name '../../outside.jpg' escapes the image folder" in msg
