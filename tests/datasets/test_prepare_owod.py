"""datasets/prepare_owod.py: COCO JSON → VOC/OWOD layout, task lists, XML round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ore.data.classes import load_task_split
from ore.data.exemplars import select_exemplars
from ore.data.records import load_coco_json, load_voc_split
from tests.scripts import load_script


@pytest.fixture(scope="module")
def prep():
    return load_script("datasets/prepare_owod.py")


def write_coco(folder: Path, images: dict[str, list[tuple[str, list[float], int]]],
               size=(64, 48)) -> Path:
    """``images``: file name → [(category, [x, y, w, h], iscrowd)]; writes tiny JPEGs."""
    import cv2

    folder.mkdir(parents=True)
    names = sorted({c for objs in images.values() for c, _, _ in objs})
    cats = [{"id": i + 7, "name": n} for i, n in enumerate(names)]
    cat_id = {c["name"]: c["id"] for c in cats}
    coco = {"images": [], "annotations": [], "categories": cats}
    for i, (file_name, objs) in enumerate(images.items()):
        cv2.imwrite(str(folder / file_name), np.full((size[1], size[0], 3), 90, np.uint8))
        coco["images"].append({"id": 100 + i, "file_name": file_name, "width": size[0],
                               "height": size[1]})
        for c, bbox, crowd in objs:
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": 100 + i,
                                        "category_id": cat_id[c], "bbox": bbox,
                                        "iscrowd": crowd})
    path = folder / "instances.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture()
def coco(tmp_path):
    split_yaml = tmp_path / "tasks.yaml"
    split_yaml.write_text("tasks: [[cat, dog], [horse], [car]]\nnever_introduced: [fox]\n")
    train = write_coco(tmp_path / "train", {
        "a.jpg": [("cat", [3, 4, 10, 12], 0), ("horse", [20, 5, 30, 20], 0)],  # → t1
        "b.jpg": [("horse", [0, 0, 64, 48], 0), ("car", [10.4, 7.6, 5.2, 8.3], 1)],  # → t2
        "c.jpg": [("car", [1, 2, 3, 4], 0), ("fox", [5, 5, 9, 9], 0)],  # → t3
        "d.jpg": [("fox", [5, 5, 9, 9], 0)],  # no task class: in no list
        "e.jpg": [("dog", [30, 10, 40, 50], 0)],  # → t1 (box clipped to the image)
        "f.jpg": [],
    })
    test = write_coco(tmp_path / "test", {
        "t1.png": [("car", [2, 2, 20, 20], 0), ("fox", [30, 20, 10, 10], 0)],
        "t2.jpg": [],
    })
    return {"train": train, "test": test, "classes": split_yaml, "tmp": tmp_path}


def run(prep, coco, out, *extra):
    return prep.main([
        "--train-json", str(coco["train"]), "--train-images", str(coco["train"].parent),
        "--test-json", str(coco["test"]), "--test-images", str(coco["test"].parent),
        "--out", str(out), "--classes", str(coco["classes"]), *extra,
    ])


def ids(root: Path, name: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{name}.txt").read_text().split()


def test_layout_lists_and_round_trip(prep, coco, capsys):
    out = coco["tmp"] / "owod"
    assert run(prep, coco, out, "--per-class", "1") == 0
    assert ids(out, "t1_train") == ["a", "e"]
    assert ids(out, "t2_train") == ["b"]
    assert ids(out, "t3_train") == ["c"]
    assert ids(out, "all_task_test") == ["t1", "t2"]
    # Exemplars: balanced over the seen classes, drawn from t1..tN train (here 1 per class).
    split = load_task_split(coco["classes"])
    train = {r.image_id: r for r in load_coco_json(coco["train"], coco["train"].parent, split)}
    for t, pool in ((2, ["a", "e", "b"]), (3, ["a", "e", "b", "c"])):
        ft = ids(out, f"t{t}_ft")
        assert ft == select_exemplars([train[i] for i in pool], split, t, 1)
        assert set(ft) <= set(pool)
        covered = {n for i in ft for n in train[i].names}
        assert set(split.seen(t)) <= covered
    assert not (out / "Annotations" / "d.xml").exists()
    assert (out / "JPEGImages" / "a.jpg").is_symlink()
    assert (out / "JPEGImages" / "t1.png").is_symlink()
    assert "t1_train: 2 images" in capsys.readouterr().out

    for list_name, json_path in (("t1_train", coco["train"]), ("t2_train", coco["train"]),
                                 ("t3_train", coco["train"]), ("all_task_test", coco["test"])):
        voc = {r.image_id: r for r in load_voc_split(out, list_name, split)}
        ref = {r.image_id: r for r in load_coco_json(json_path, json_path.parent, split)}
        for i, r in voc.items():
            assert r.names == ref[i].names
            np.testing.assert_array_equal(r.difficult, ref[i].difficult)
            # Integer COCO boxes come back exactly; fractional ones rounded to the pixel.
            np.testing.assert_allclose(r.boxes, ref[i].boxes, atol=0.5)
            assert (r.width, r.height) == (ref[i].width, ref[i].height)
    b = load_voc_split(out, "t2_train", split)[0]
    # car [10.4, 7.6, 5.2, 8.3]: xmin 11.4 → 11, ymin 8.6 → 9, xmax 15.6 → 16, ymax 15.9 → 16
    np.testing.assert_array_equal(b.boxes[1], [11, 9, 16, 16])
    assert b.difficult.tolist() == [False, True]  # iscrowd → difficult
    a = load_voc_split(out, "t1_train", split)[0]
    np.testing.assert_array_equal(a.boxes, [[4, 5, 13, 16], [21, 6, 50, 25]])


def test_copy_and_coco_names(prep, tmp_path):
    # COCO spellings become VOC names in the XML ("dining table" → diningtable).
    train = write_coco(tmp_path / "train", {"x.jpg": [("dining table", [1, 1, 9, 9], 0),
                                                      ("truck", [20, 20, 5, 5], 0)]})
    test = write_coco(tmp_path / "test", {"y.jpg": [("tv", [1, 1, 9, 9], 0)]})
    out = tmp_path / "root"
    assert prep.main(["--train-json", str(train), "--train-images", str(train.parent),
                      "--test-json", str(test), "--test-images", str(test.parent),
                      "--out", str(out), "--copy"]) == 0
    assert not (out / "JPEGImages" / "x.jpg").is_symlink()
    assert (out / "JPEGImages" / "x.jpg").is_file()
    xml = (out / "Annotations" / "x.xml").read_text()
    assert "<name>diningtable</name>" in xml and "<name>truck</name>" in xml
    assert "<name>tvmonitor</name>" in (out / "Annotations" / "y.xml").read_text()
    assert ids(out, "t1_train") == ["x"] and ids(out, "t2_train") == []
    assert ids(out, "t2_ft") == ["x"]


def test_user_mistakes_exit_2_with_one_line(prep, coco, capsys):
    out = coco["tmp"] / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert run(prep, coco, out) == 2  # not empty
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not an empty folder" in err and err.count("\n") == 1
    assert run(prep, coco, coco["tmp"] / "p", "--per-class", "0") == 2
    assert "--per-class" in capsys.readouterr().err
    # The same image name in train and test.
    same = coco["tmp"] / "q"
    assert prep.main(["--train-json", str(coco["train"]), "--train-images",
                      str(coco["train"].parent), "--test-json", str(coco["train"]),
                      "--test-images", str(coco["train"].parent), "--out", str(same),
                      "--classes", str(coco["classes"])]) == 2
    assert "unique" in capsys.readouterr().err and not same.exists()
    # A class in no task of the split.
    assert prep.main(["--train-json", str(coco["train"]), "--train-images",
                      str(coco["train"].parent), "--test-json", str(coco["test"]),
                      "--test-images", str(coco["test"].parent), "--out", str(same)]) == 2
    assert "fox" in capsys.readouterr().err and not same.exists()
    with pytest.raises(SystemExit) as exc:
        prep.main(["--train-json", "x"])
    assert exc.value.code == 2
    assert not list(coco["tmp"].glob(".p.*")) and not list(coco["tmp"].glob(".q.*"))


def test_labelme_coco_round_trip(prep, labelme_examples, tmp_path):
    """Real VOC 2011 photos: the labelme COCO JSON gives the boxes of its VOC XML."""
    data = labelme_examples / "instance_segmentation" / "data_dataset_coco"
    out = tmp_path / "owod"
    args = ["--train-json", str(data / "annotations.json"), "--train-images", str(data),
            "--out", str(out), "--per-class", "2"]
    # The same photos cannot be both train and test: a copy of the JSON with other names.
    coco = json.loads((data / "annotations.json").read_text())
    test_dir = tmp_path / "test"
    (test_dir / "JPEGImages").mkdir(parents=True)
    for img in coco["images"]:
        new = img["file_name"].replace(".jpg", "_test.jpg")
        shutil.copyfile(data / img["file_name"], test_dir / new)
        img["file_name"] = new
    (test_dir / "ann.json").write_text(json.dumps(coco))
    assert prep.main([*args, "--test-json", str(test_dir / "ann.json"),
                      "--test-images", str(test_dir)]) == 0
    split = load_task_split("owod")
    ref = {r.image_id: r for r in load_coco_json(data / "annotations.json", data, split)}
    voc = {r.image_id: r for r in load_voc_split(out, "t1_train", split)}
    assert set(voc) == set(ref) and len(voc) == 3
    for i, r in voc.items():
        assert r.names == ref[i].names
        np.testing.assert_allclose(r.boxes, ref[i].boxes, atol=0.5)
    assert len(load_voc_split(out, "all_task_test", split)) == 3
