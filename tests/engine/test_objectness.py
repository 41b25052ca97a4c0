"""The whole-object score: crops against the pixels they come from, the training boxes
against IoU computed by hand, what it learns on the toy world, the run's training labels,
and discover keeping only the boxes it scores as whole objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ore.config import CONFIG_ROOT, load_config
from ore.data.classes import load_task_split
from ore.data.dataset import voc_to_model_boxes
from ore.data.images import decode_image
from ore.data.records import load_dataset_split, load_voc_split
from ore.engine.discover import Unknowns, filter_whole_objects
from ore.engine.objectness import (
    BACKGROUND_IOU,
    BACKGROUND_PER_IMAGE,
    MIN_SIDE,
    PART_IOU,
    POSITIVE_IOU,
    run_training_records,
    sample_boxes,
    score_boxes,
    train_objectness,
)
from ore.engine.tasks import run_tasks
from ore.errors import OreError
from ore.modeling.objectness import crop_boxes


def test_a_crop_of_its_own_size_is_the_pixels_and_the_margin_grows_it():
    image = torch.rand(3, 40, 50)
    crop = crop_boxes(image, torch.tensor([[7.0, 5.0, 23.0, 21.0]]), size=16, margin=0.0)
    assert torch.allclose(crop[0], image[:, 5:21, 7:23], atol=1e-6)
    # Margin 0.5 of a 10-pixel box adds 5 pixels on every side: a 20-pixel crop.
    crop = crop_boxes(image, torch.tensor([[15.0, 10.0, 25.0, 20.0]]), size=20, margin=0.5)
    assert torch.allclose(crop[0], image[:, 5:25, 10:30], atol=1e-6)
    # More than a pixel past the image's edge the crop is 0 (within one pixel roi_align
    # takes the edge pixel).
    crop = crop_boxes(image, torch.tensor([[-4.0, 0.0, 4.0, 8.0]]), size=8, margin=0.0)
    assert torch.all(crop[0, :, :, :3] == 0)
    assert torch.allclose(crop[0, :, :, 3], image[:, 0:8, 0], atol=1e-6)
    assert torch.allclose(crop[0, :, :, 4:], image[:, 0:8, 0:4], atol=1e-6)


def _iou(a, b) -> float:
    """IoU of two 0-based xyxy boxes, from the formula."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_training_boxes_fall_in_their_iou_bands():
    gt = torch.tensor([[10.0, 10.0, 40.0, 50.0], [60.0, 20.0, 90.0, 45.0],
                       [100.0, 100.0, 102.0, 130.0]])  # the last is too thin: left out
    boxes, labels = sample_boxes(gt, 160, 200, torch.Generator().manual_seed(0))
    kept = gt[:2].tolist()
    assert len(boxes) == len(labels)
    whole = boxes[labels == 1].tolist()
    assert whole[:2] == kept  # the boxes themselves come first
    for b in whole:
        assert max(_iou(b, g) for g in kept) >= POSITIVE_IOU
    assert 2 <= len(whole) <= 4
    rest = boxes[labels == 0].tolist()
    parts = [b for b in rest if max(_iou(b, g) for g in kept) >= BACKGROUND_IOU]
    background = [b for b in rest if b not in parts]
    for b in parts:  # a part of its own box; another box may overlap it less
        assert any(PART_IOU[0] <= _iou(b, g) < PART_IOU[1] for g in kept)
        assert max(_iou(b, g) for g in kept) < POSITIVE_IOU
    assert 1 <= len(parts) <= 4
    assert len(background) <= BACKGROUND_PER_IMAGE
    for b in background:
        assert 0 <= b[0] < b[2] <= 200 and 0 <= b[1] < b[3] <= 160
        assert all(_iou(b, g) < BACKGROUND_IOU for g in gt.tolist())
    assert all(min(b[2] - b[0], b[3] - b[1]) >= MIN_SIDE for b in whole)
    # Same generator seed, same boxes.
    again, _ = sample_boxes(gt, 160, 200, torch.Generator().manual_seed(0))
    assert torch.equal(again, boxes)
    # No labelled object: background only.
    boxes, labels = sample_boxes(torch.zeros(0, 4), 160, 200, torch.Generator().manual_seed(1))
    assert len(boxes) == BACKGROUND_PER_IMAGE and not labels.any()


def test_the_score_learns_to_rank_whole_objects_above_parts_on_unseen_images(toy_root):
    split = load_task_split(toy_root / "classes.yaml")
    train = load_voc_split(toy_root, "t1_train", split)
    model = train_objectness(train, steps=300, seed=0)
    whole, cut = [], []
    g = torch.Generator().manual_seed(5)
    for r in load_voc_split(toy_root, "t2_train", split):  # images it never saw
        gt = torch.from_numpy(voc_to_model_boxes(r.boxes))
        boxes, labels = sample_boxes(gt, r.height, r.width, g)
        s = score_boxes(model, decode_image(r.file_name), boxes.numpy())
        whole += s[labels.numpy() == 1].tolist()
        cut += s[labels.numpy() == 0].tolist()
    whole, cut = np.array(whole), np.array(cut)
    # AUC by counting pairs: the share of (whole, not whole) pairs ranked right.
    auc = (whole[:, None] > cut[None, :]).mean()
    assert auc > 0.75, auc
    assert model.training is False


def test_the_run_training_labels_are_every_stage_list_with_its_classes(tmp_path, toy_root):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("t1_train", "t2_train"):
        (configs / f"{name}.yaml").write_text(
            f"_BASE_: {CONFIG_ROOT / 'toy' / (name + '.yaml')}\n")
    run = tmp_path / "run"
    tiny = ["SOLVER.MAX_ITER=1", "SOLVER.STEPS=[]", "SOLVER.WARMUP_ITERS=0",
            "DATALOADER.NUM_WORKERS=0", "EBUI.RUN_TASKS=false", "INPUT.MIN_SIZE_TRAIN=[64]",
            "INPUT.MAX_SIZE_TRAIN=96"]
    run_tasks(configs, run, [f"DATASETS.ROOT={toy_root}", *tiny], evaluate=False)
    records = run_training_records(run)
    expected = {}
    for t in (1, 2):  # each stage's list, as that stage loaded it
        cfg = load_config(run / f"t{t}_train" / "config.yaml")
        split = load_task_split(cfg.DATASETS.CLASSES)
        for r in load_dataset_split(cfg.DATASETS, cfg.DATASETS.TRAIN, split, t,
                                    cfg.DATASETS.TRAIN_ROLE):
            names = [n for n in r.names if n in split.seen(t)]
            if names:
                expected.setdefault(r.file_name, []).extend(names)
    assert {r.file_name: r.names for r in records} == expected
    assert all(len(r.boxes) == len(r.names) for r in records)
    # A model of task 1 learns from task 1's labels only.
    first = run_training_records(run, up_to_task=1)
    cfg = load_config(run / "t1_train" / "config.yaml")
    split = load_task_split(cfg.DATASETS.CLASSES)
    assert {r.file_name for r in first} == {
        r.file_name for r in load_dataset_split(cfg.DATASETS, cfg.DATASETS.TRAIN, split, 1,
                                                cfg.DATASETS.TRAIN_ROLE) if r.names}
    assert {n for r in first for n in r.names} <= set(split.seen(1))
    with pytest.raises(OreError, match="no training labels"):
        run_training_records(tmp_path / "configs")


def test_discover_keeps_the_boxes_at_or_over_the_threshold(toy_root, monkeypatch):
    from ore.engine import discover as disc

    split = load_task_split(toy_root / "classes.yaml")
    records = load_voc_split(toy_root, "t1_train", split)[:6]
    images = [r.file_name for r in records]
    boxes = np.concatenate([voc_to_model_boxes(r.boxes) for r in records]).astype(np.float32)
    counts = [len(r.names) for r in records]
    image = np.repeat(np.arange(len(records)), counts)
    n = len(boxes)
    # Rows of the images interleaved, as no detector returns them: grouping must hold.
    shuffle = np.random.default_rng(0).permutation(n)
    boxes, image = boxes[shuffle], image[shuffle]
    unknowns = Unknowns(images=images, sizes=np.array([[r.height, r.width] for r in records]),
                        image=image, boxes=boxes, scores=np.linspace(0.1, 0.9, n, dtype=np.float32),
                        features=np.eye(n, 4, dtype=np.float32))
    # A score fixed by the box (its width over 100) stands for the learnt one.
    monkeypatch.setattr(disc, "train_objectness", lambda *a, **k: "model")
    seen = []

    def fixed(model, rgb, b):
        seen.append(len(b))
        return ((b[:, 2] - b[:, 0]) / 100).astype(np.float32)

    monkeypatch.setattr(disc, "score_boxes", fixed)
    kept, dropped = filter_whole_objects(unknowns, records, 0.3)
    width = (boxes[:, 2] - boxes[:, 0]) / 100
    rows = np.flatnonzero(width >= 0.3)
    assert 0 < len(rows) < n  # both kept and dropped boxes
    assert sorted(seen) == sorted(counts)  # each image decoded and scored once
    assert np.array_equal(kept.boxes, boxes[rows]) and np.array_equal(kept.image, image[rows])
    assert np.allclose(kept.objectness, width[rows])
    assert len(dropped) == n - len(rows)
    assert all(d["reason"].startswith("whole-object score 0.") and "under 0.3" in d["reason"]
               for d in dropped)
    assert [d["box"] for d in dropped] == [
        np.round(boxes[i].astype(np.float64), 2).tolist() for i in np.flatnonzero(width < 0.3)]


def test_training_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps must be"):
        train_objectness([], steps=0)
