from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from ore.cli import main
from ore.data.classes import TOY_NEVER_INTRODUCED, TOY_TASKS, UNKNOWN, load_task_split
from ore.data.dataset import (
    DetectionDataset,
    TrainBatchSampler,
    TrainTransform,
    split_bad,
    voc_to_model_boxes,
)
from ore.data.records import apply_role, load_coco_json, load_split, load_voc_split
from ore.data.toy import write_toy_world
from ore.errors import OreError

TOY = load_task_split("toy")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- class splits -------------------------------------------------------------------------

def test_builtin_splits_layout():
    owod = load_task_split("owod")
    assert owod.num_tasks == 4 and owod.num_classes == 80
    assert owod.label("aeroplane") == 1 and owod.label("bowl") == 80
    assert owod.label(UNKNOWN) == 81
    assert owod.previous(2) == owod.introduced(1)
    assert set(load_task_split("sowod").classes) == set(owod.classes)
    assert TOY.num_classes == 20 and len(TOY.never_introduced) >= 3


def test_split_yaml(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("tasks:\n  - [Cat, dog]\n  - [Airplane]\nnever_introduced: [fox]\n")
    s = load_task_split(f)
    assert s.tasks == (("cat", "dog"), ("aeroplane",))  # lower-cased, COCO name aliased
    assert s.is_known_name("fox") and not s.is_known_name("owl")
    f.write_text("tasks:\n  - [cat]\n  - [cat]\n")
    with pytest.raises(OreError, match="appears twice"):
        load_task_split(f)
    f.write_text("task: [[cat]]\n")
    with pytest.raises(OreError, match="tasks"):
        load_task_split(f)
    with pytest.raises(OreError, match="expected one of"):
        load_task_split("voc2007")


# --- the toy world ------------------------------------------------------------------------

def test_toy_world_is_deterministic(tmp_path):
    kw = dict(images_per_task=3, val_images=2, test_images=2, exemplars_per_class=1)
    a = tree_digest(write_toy_world(tmp_path / "a", seed=5, **kw))
    b = tree_digest(write_toy_world(tmp_path / "b", seed=5, **kw))
    c = tree_digest(write_toy_world(tmp_path / "c", seed=6, **kw))
    assert a == b
    assert a.keys() == c.keys() and a != c
    with pytest.raises(OreError, match="exists and is not empty"):
        write_toy_world(tmp_path / "a", seed=5, **kw)


def test_toy_world_layout_and_content(toy_root):
    lists = {p.stem for p in (toy_root / "ImageSets" / "Main").glob("*.txt")}
    assert lists == {"t1_train", "t2_train", "t3_train", "t4_train", "t2_ft", "t3_ft", "t4_ft",
                     "all_task_val", "all_task_test"}
    test = load_voc_split(toy_root, "all_task_test", TOY)
    names = {n for r in test for n in r.names}
    assert set(TOY_NEVER_INTRODUCED) <= names  # true unknowns exist
    t1 = load_voc_split(toy_root, "t1_train", TOY)
    t1_names = [n for r in t1 for n in r.names]
    # Training images of task 1 contain unlabelled objects of later / never-taught classes.
    assert sum(n in TOY_TASKS[0] for n in t1_names) > len(t1_names) / 3
    assert any(n not in TOY_TASKS[0] for n in t1_names)
    boxes = np.concatenate([r.boxes for r in test])
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) + 1
    assert sides.max() <= 96 and np.median(sides) > 12
    assert any(r.difficult.any() for r in test + t1)  # occlusion makes some objects difficult
    # Finetune lists draw only from earlier training images.
    ft = set((toy_root / "ImageSets/Main/t3_ft.txt").read_text().split())
    earlier = {r.image_id for s in ("t1_train", "t2_train", "t3_train")
               for r in load_voc_split(toy_root, s, TOY)}
    assert ft and ft <= earlier


def test_voc_and_coco_readers_agree_on_toy(toy_root):
    voc = load_split(toy_root, "all_task_val", TOY, "voc")
    coco = load_split(toy_root, "all_task_val", TOY, "coco")
    assert [r.image_id for r in voc] == [r.image_id for r in coco]
    for a, b in zip(voc, coco):
        assert a.names == b.names and (a.width, a.height) == (b.width, b.height)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.difficult, b.difficult)


# --- real PASCAL VOC photos (labelme sdist) -----------------------------------------------

def test_real_voc_photos(labelme_examples, tmp_path):
    src = labelme_examples / "bbox_detection" / "data_dataset_voc"
    root = tmp_path / "voc"
    shutil.copytree(src, root)
    ids = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids + ids[:1]) + "\n")
    owod = load_task_split("owod")
    recs = load_voc_split(root, "val", owod)
    assert [r.image_id for r in recs] == ["2011_000003", "2011_000006", "2011_000025"]
    assert recs[0].names == ["person", "person"]
    assert (recs[0].width, recs[0].height) == (500, 338)
    assert not any(r.difficult.any() for r in recs)  # <difficult/> empty means not difficult
    coco = load_coco_json(labelme_examples / "instance_segmentation" / "data_dataset_coco" /
                          "annotations.json",
                          labelme_examples / "instance_segmentation" / "data_dataset_coco", owod)
    by_id = {r.image_id: r for r in coco}
    for r in recs:
        c = by_id[r.image_id]
        # Same photos, annotated as polygons (COCO, one more object) and as rectangles
        # (VOC) by hand: every VOC box has a COCO box of its class with IoU > 0.7.
        assert set(r.names) <= set(c.names)
        for name, box in zip(r.names, r.boxes):
            cands = c.boxes[[n == name for n in c.names]]
            lt, rb = np.maximum(cands[:, :2], box[:2]), np.minimum(cands[:, 2:], box[2:])
            inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
            union = np.prod(cands[:, 2:] - cands[:, :2], 1) + np.prod(box[2:] - box[:2]) - inter
            assert (inter / union).max() > 0.7
    # Test role for task 1: everything is a VOC class, so nothing becomes unknown.
    assert UNKNOWN not in {n for r in apply_role(recs, owod, 1, "test") for n in r.names}
    # Dataset items: real JPEGs decode, boxes are 0-based in model coordinates.
    ds = DetectionDataset(recs, owod)
    img, target, meta = ds[0]
    assert img.shape == (3, 338, 500) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert target["labels"].tolist() == [owod.label("person")] * 2
    np.testing.assert_allclose(target["boxes"][1].numpy(), [364, 82, 500, 333])


# --- roles --------------------------------------------------------------------------------

def test_roles_filter_per_spec(toy_root):
    recs = load_voc_split(toy_root, "t2_train", TOY)
    train = apply_role(recs, TOY, 2, "train")
    assert all(set(r.names) <= set(TOY.introduced(2)) and r.names for r in train)
    expected = sum(any(n in TOY.introduced(2) for n in r.names) for r in recs)
    assert len(train) == expected  # images without a task-2 object are dropped
    ft = apply_role(recs, TOY, 2, "finetune")
    assert all(set(r.names) <= set(TOY.seen(2)) for r in ft)
    assert sum(len(r.names) for r in ft) == sum(n in TOY.seen(2) for r in recs for n in r.names)
    test = apply_role(recs, TOY, 2, "test")
    assert len(test) == len(recs)
    for before, after in zip(recs, test):
        assert [a if b in TOY.seen(2) else UNKNOWN for a, b in zip(before.names, before.names)] \
            == after.names
        np.testing.assert_array_equal(before.difficult, after.difficult)
    with pytest.raises(OreError, match="split role"):
        apply_role(recs, TOY, 2, "training")


def test_dataset_stats_cli(toy_root, capsys):
    args = ["dataset-stats", "--root", str(toy_root), "--split", "all_task_test", "--task", "t1",
            "--role", "test", "--classes", "toy", "--json"]
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    recs = load_voc_split(toy_root, "all_task_test", TOY)
    assert stats["images"] == len(recs)
    n_unknown = sum(n not in TOY.introduced(1) for r in recs for n in r.names)
    assert stats["objects"]["unknown"] == n_unknown
    assert set(stats["objects"]) <= set(TOY.introduced(1)) | {UNKNOWN}


# --- bad input ----------------------------------------------------------------------------

def make_voc(tmp_path, xml: str, ids=("a",), image=True) -> Path:
    root = tmp_path / "ds"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for i in ids:
        (root / "Annotations" / f"{i}.xml").write_text(xml)
        if image:
            import cv2
            cv2.imwrite(str(root / "JPEGImages" / f"{i}.jpg"), np.zeros((40, 50, 3), np.uint8))
    (root / "ImageSets" / "Main" / "s.txt").write_text("\n".join(ids) + "\n")
    return root


GOOD_XML = ("<annotation><size><width>50</width><height>40</height></size><object><name>{}"
            "</name><difficult>0</difficult><bndbox><xmin>{}</xmin><ymin>2</ymin><xmax>{}</xmax>"
            "<ymax>30</ymax></bndbox></object></annotation>")


def test_bad_input_errors_name_the_file(tmp_path):
    with pytest.raises(OreError, match="dataset root not found"):
        load_voc_split(tmp_path / "none", "s", TOY)
    root = make_voc(tmp_path, GOOD_XML.format("circle", 3, 20))
    with pytest.raises(OreError, match=r"image list not found: .*nolist\.txt"):
        load_voc_split(root, "nolist", TOY)
    (root / "Annotations" / "a.xml").write_text("<annotation><object>")
    with pytest.raises(OreError, match=r"a\.xml: malformed XML"):
        load_voc_split(root, "s", TOY)
    (root / "Annotations" / "a.xml").write_text(GOOD_XML.format("unicorn", 3, 20))
    with pytest.raises(OreError, match=r"a\.xml: class 'unicorn' is in no task"):
        load_voc_split(root, "s", TOY)
    (root / "Annotations" / "a.xml").write_text(GOOD_XML.format("circle", "x", 20))
    with pytest.raises(OreError, match=r"<xmin> is 'x'"):
        load_voc_split(root, "s", TOY)
    (root / "JPEGImages" / "a.jpg").unlink()
    (root / "Annotations" / "a.xml").write_text(GOOD_XML.format("circle", 3, 20))
    with pytest.raises(OreError, match=r"image for listed id 'a' not found"):
        load_voc_split(root, "s", TOY)
    (root / "ImageSets" / "Main" / "s.txt").write_text("../../etc/passwd\n")
    with pytest.raises(OreError, match="not a plain file stem"):
        load_voc_split(root, "s", TOY)


def test_corrupt_image_is_an_error_or_skipped(tmp_path, caplog):
    root = make_voc(tmp_path, GOOD_XML.format("circle", 3, 20))
    (root / "JPEGImages" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = DetectionDataset(load_voc_split(root, "s", TOY), TOY)
    with pytest.raises(OreError, match=r"cannot read image .*a\.jpg"):
        split_bad([ds[0]], skip_bad=False)
    counter: dict = {}
    with caplog.at_level(logging.WARNING):
        assert split_bad([ds[0]], skip_bad=True, counter=counter) == []
    assert counter == {"bad_images": 1} and "a.jpg" in caplog.text


def test_duplicates_clipping_and_degenerate_boxes(tmp_path, caplog):
    root = make_voc(tmp_path, GOOD_XML.format("circle", 3, 80), ids=("a", "b"))
    (root / "ImageSets" / "Main" / "s.txt").write_text("a\nb\na\n\nb\n")
    with caplog.at_level(logging.WARNING):
        recs = load_voc_split(root, "s", TOY)
    assert [r.image_id for r in recs] == ["a", "b"]
    assert "2 duplicate image ids" in caplog.text
    np.testing.assert_array_equal(recs[0].boxes, [[3, 2, 50, 30]])  # clipped to the width
    (root / "Annotations" / "a.xml").write_text(GOOD_XML.format("circle", 30, 10))
    recs = load_voc_split(root, "s", TOY)
    assert len(recs[0].names) == 0 and "degenerate" in caplog.text


# --- transforms and sampling --------------------------------------------------------------

def test_train_transform_resizes_and_flips_boxes():
    img = np.zeros((100, 200, 3), np.uint8)
    img[10:30, 20:60] = 255  # a white box at x 20..60, y 10..30 (0-based, continuous)
    boxes = np.array([[20, 10, 60, 30]], np.float32)
    t = TrainTransform((50, 50), 1000, flip_prob=1.0)
    out, b = t(img, boxes, np.random.default_rng(0))
    assert out.shape[:2] == (50, 100)  # shortest side 50
    np.testing.assert_allclose(b, [[100 - 30, 5, 100 - 10, 15]])
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert abs(xs.min() - b[0, 0]) <= 1 and abs(xs.max() + 1 - b[0, 2]) <= 1
    capped = TrainTransform((80, 80), 120, flip_prob=0.0)(img, boxes, np.random.default_rng(0))
    assert capped[0].shape[:2] == (60, 120)  # longest side capped
    np.testing.assert_allclose(voc_to_model_boxes(np.array([[1, 1, 10, 10]], np.float32)),
                               [[0, 0, 10, 10]])


def test_batch_sampler_groups_shards_and_resumes():
    groups = np.array([0, 1] * 10 + [0] * 5)
    s = TrainBatchSampler(groups, 4, seed=1)
    it = iter(s)
    batches = [next(it) for _ in range(12)]
    for b in batches:
        assert len({groups[i] for i, _ in b}) == 1  # one aspect group per batch
    again = iter(TrainBatchSampler(groups, 4, seed=1))
    assert [next(again) for _ in range(12)] == batches  # seeded
    resumed = iter(TrainBatchSampler(groups, 4, seed=1, start_iter=5))
    assert [next(resumed) for _ in range(7)] == batches[5:]
    r0 = iter(TrainBatchSampler(groups, 2, seed=1, rank=0, world_size=2, group=False))
    r1 = iter(TrainBatchSampler(groups, 2, seed=1, rank=1, world_size=2, group=False))
    first_epoch = [i for _ in range(7) for it_ in (r0, r1) for i, _ in next(it_)][:26]
    assert sorted(set(first_epoch)) == list(range(len(groups)))  # ranks cover the epoch


def test_coco_images_may_be_symlinks_but_names_may_not_escape(tmp_path):
    import cv2

    elsewhere = tmp_path / "store" / "real.jpg"
    elsewhere.parent.mkdir()
    cv2.imwrite(str(elsewhere), np.zeros((20, 30, 3), np.uint8))
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").symlink_to(elsewhere)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 30, "height": 20}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5]}],
            "categories": [{"id": 1, "name": "circle"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    rec = load_coco_json(path, images, TOY)[0]
    np.testing.assert_array_equal(rec.boxes, [[3, 4, 12, 8]])  # x+1, y+1, x+w, y+h
    data["images"][0]["file_name"] = "../store/real.jpg"
    path.write_text(json.dumps(data))
    with pytest.raises(OreError, match="escapes the image folder"):
        load_coco_json(path, images, TOY)
