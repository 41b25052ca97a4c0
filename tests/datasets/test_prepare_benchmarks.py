"""datasets/prepare_owod.py mowodb / sowodb: the public benchmarks from their downloads.

The inputs are small fakes laid out as the real downloads unpack: ``VOCdevkit/VOC2007`` and
``VOCdevkit/VOC2012`` (from the VOC tars), ``train2017/``, ``val2017/`` and
``annotations/instances_{train,val}2017.json`` (from the COCO zips), and a folder of lists.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ore.data.classes import load_task_split
from ore.data.records import ImageRecord, load_voc_split, parse_voc_xml, voc_xml
from tests.scripts import load_script


@pytest.fixture(scope="module")
def prep():
    return load_script("datasets/prepare_owod.py", "prepare_owod_bench")


def _jpeg(path: Path, value: int) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((48, 64, 3), value, np.uint8))


def _voc(root: Path, image_id: str, objects: list[tuple[str, list[int]]]) -> None:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    objs = "".join(
        f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    (root / "Annotations" / f"{image_id}.xml").write_text(
        f"<annotation><folder>VOC</folder><filename>{image_id}.jpg</filename><size><width>64"
        f"</width><height>48</height><depth>3</depth></size>{objs}</annotation>")
    _jpeg(root / "JPEGImages" / f"{image_id}.jpg", len(image_id) * 7)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(exist_ok=True)
    (root / "SegmentationClass" / f"{image_id}.png").write_bytes(b"not needed")


# COCO objects: (category, [x, y, w, h], iscrowd); fractional boxes test the rounding rule.
COCO_TRAIN = {
    "000000000009.jpg": [("airplane", [10.4, 7.6, 5.2, 8.3], 0), ("truck", [0, 0, 64, 48], 1)],
    "000000000025.jpg": [("couch", [3.999, 2.5, 20.0, 10.49], 0), ("frisbee", [1, 1, 2, 2], 0)],
    "000000000030.jpg": [("bed", [5.5, 6.5, 7.25, 8.75], 0)],
    "000000000034.jpg": [],  # in the JSON without objects
}
COCO_VAL = {
    "000000000139.jpg": [("tv", [2.2, 3.3, 30.7, 20.1], 0), ("dining table", [0, 0, 1, 1], 0)],
    "000000000285.jpg": [("bear", [12.0, 4.0, 40.0, 30.0], 0)],
}


def _coco(images_dir: Path, json_path: Path, images: dict, first_id: int) -> None:
    cats = sorted({c for objs in COCO_TRAIN.values() for c, _, _ in objs}
                  | {c for objs in COCO_VAL.values() for c, _, _ in objs})
    cat_id = {c: i + 1 for i, c in enumerate(cats)}
    data = {"images": [], "annotations": [],
            "categories": [{"id": i, "name": c, "supercategory": "x"} for c, i in cat_id.items()]}
    for k, (name, objs) in enumerate(images.items()):
        _jpeg(images_dir / name, 30 + k)
        data["images"].append({"id": first_id + k, "file_name": name, "width": 64,
                               "height": 48})
        for c, bbox, crowd in objs:
            data["annotations"].append({"id": len(data["annotations"]) + 1,
                                        "image_id": first_id + k, "category_id": cat_id[c],
                                        "bbox": bbox, "iscrowd": crowd, "area": 1.0})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data))


LISTS = {
    "t1_train": ["000005", "2008_000002", "2007_000027"],
    "t2_train": ["000000000009", "000000000025"],
    "t2_ft": ["000005", "000000000009"],
    "t3_train": ["000000000025"],
    "t3_ft": ["2008_000002", "000000000025"],
    "t4_train": ["000000000030", "000000000034"],
    "t4_ft": ["000000000030"],
    "all_task_val": ["000007", "000000000030"],
    # The public test list repeats ids: they are kept.
    "all_task_test": ["000001", "000000000139", "000000000285", "000000000139"],
}
FAKE_COUNTS = ",".join(f"{k}={len(v)}" for k, v in LISTS.items())


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict[str, Path]:
    """Extracted downloads, the same as archives, and a lists folder."""
    tmp = tmp_path_factory.mktemp("downloads")
    trainval, test, voc12 = tmp / "voc07tv", tmp / "voc07test", tmp / "voc12"
    _voc(trainval / "VOCdevkit" / "VOC2007", "000005", [("chair", [263, 211, 324, 339])])
    _voc(trainval / "VOCdevkit" / "VOC2007", "000007", [("car", [1, 1, 64, 48])])
    _voc(test / "VOCdevkit" / "VOC2007", "000001", [("dog", [48, 240, 195, 371]),
                                                    ("person", [8, 12, 352, 498])])
    _voc(voc12 / "VOCdevkit" / "VOC2012", "2008_000002", [("tvmonitor", [34, 11, 448, 293])])
    _voc(voc12 / "VOCdevkit" / "VOC2012", "2007_000027", [("person", [174, 101, 349, 351])])
    coco = tmp / "coco"
    _coco(coco / "train2017", coco / "annotations" / "instances_train2017.json",
          COCO_TRAIN, 9)
    _coco(coco / "val2017", coco / "annotations" / "instances_val2017.json", COCO_VAL, 139)
    (coco / "annotations" / "captions_train2017.json").write_text("{}")
    lists = tmp / "lists"
    lists.mkdir()
    for name, ids in LISTS.items():
        (lists / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    # The archives, with the members laid out as in the real downloads.
    arch = tmp / "archives"
    arch.mkdir()
    for name, src in (("VOCtrainval_06-Nov-2007.tar", trainval),
                      ("VOCtest_06-Nov-2007.tar", test), ("VOCtrainval_11-May-2012.tar", voc12)):
        with tarfile.open(arch / name, "w") as tar:
            tar.add(src / "VOCdevkit", arcname="VOCdevkit")
    for name, folder in (("train2017.zip", "train2017"), ("val2017.zip", "val2017"),
                         ("annotations_trainval2017.zip", "annotations")):
        with zipfile.ZipFile(arch / name, "w") as z:
            for f in sorted((coco / folder).iterdir()):
                z.write(f, f"{folder}/{f.name}")
    return {"voc07tv": trainval / "VOCdevkit", "voc07test": test / "VOCdevkit",
            "voc12": voc12 / "VOCdevkit", "coco": coco, "lists": lists, "archives": arch}


def folder_args(d, lists=None):
    return ["mowodb", "--voc2007", str(d["voc07tv"]), str(d["voc07test"]),
            "--voc2012", str(d["voc12"]), "--coco-train-images", str(d["coco"] / "train2017"),
            "--coco-val-images", str(d["coco"] / "val2017"),
            "--coco-annotations", str(d["coco"] / "annotations"),
            "--lists", str(lists or d["lists"])]


def archive_args(d):
    a = d["archives"]
    return ["mowodb", "--voc2007", str(a / "VOCtrainval_06-Nov-2007.tar"),
            str(a / "VOCtest_06-Nov-2007.tar"), "--voc2012", str(a / "VOCtrainval_11-May-2012.tar"),
            "--coco-train-images", str(a / "train2017.zip"),
            "--coco-val-images", str(a / "val2017.zip"),
            "--coco-annotations", str(a / "annotations_trainval2017.zip"),
            "--lists", str(d["lists"])]


def naive_reference_box(x, y, w, h):
    """The reference conversion, one box at a time in plain Python."""
    return [int(x + 1.0), int(y + 1.0), int(x + w + 1.0), int(y + h + 1.0)]


def test_reference_box_rule_matches_naive_conversion(prep):
    rng = random.Random(0)
    boxes = [[rng.uniform(0, 600), rng.uniform(0, 400), rng.uniform(0, 300), rng.uniform(0, 300)]
             for _ in range(500)]
    boxes += [[0, 0, 64, 48], [10.4, 7.6, 5.2, 8.3], [0.999999, 1e-9, 2.0000001, 0.5]]
    got = prep.coco_reference_boxes(np.array(boxes))
    assert got.tolist() == [naive_reference_box(*b) for b in boxes]
    assert prep.coco_reference_boxes(np.zeros((0, 4))).shape == (0, 4)


def test_mowodb_from_folders(prep, downloads, tmp_path, capsys):
    out = tmp_path / "OWOD"
    assert prep.main([*folder_args(downloads), "--out", str(out),
                      "--expect-counts", FAKE_COUNTS]) == 0
    printed = capsys.readouterr().out
    assert "all_task_test: 4 ids (3 unique)" in printed and f"wrote {out}" in printed
    main = out / "ImageSets" / "Main"
    for name, ids in LISTS.items():  # installed as given, repeats kept
        assert (main / f"{name}.txt").read_text().split() == ids
    every = {i for ids in LISTS.values() for i in ids}
    assert {p.stem for p in (out / "Annotations").iterdir()} == every
    assert {p.stem for p in (out / "JPEGImages").iterdir()} == every
    # VOC: the original XML, byte for byte; the image linked to its source.
    src = downloads["voc12"] / "VOC2012"
    assert (out / "Annotations" / "2008_000002.xml").read_bytes() == (
        src / "Annotations" / "2008_000002.xml").read_bytes()
    link = out / "JPEGImages" / "2008_000002.jpg"
    assert link.is_symlink() and Path(os.readlink(link)) == (
        src / "JPEGImages" / "2008_000002.jpg").resolve()
    assert (out / "JPEGImages" / "000000000139.jpg").is_symlink()
    # COCO: the reference's corners, VOC names, difficult 0 (the crowd truck too).
    for file_name, objs in {**COCO_TRAIN, **COCO_VAL}.items():
        stem = Path(file_name).stem
        if stem not in every:
            continue
        xml = out / "Annotations" / f"{stem}.xml"
        r = parse_voc_xml(xml, out / "JPEGImages" / file_name)
        assert r.names == [{"airplane": "aeroplane", "couch": "sofa", "tv": "tvmonitor",
                            "dining table": "diningtable"}.get(c, c) for c, _, _ in objs]
        text = xml.read_text()
        for (_, bbox, _), got in zip(objs, text.split("<bndbox>")[1:]):
            want = naive_reference_box(*bbox)
            vals = [int(got.split(f"<{t}>")[1].split("<")[0])
                    for t in ("xmin", "ymin", "xmax", "ymax")]
            assert vals == want
        assert "<difficult>1</difficult>" not in text
    # xmax = int(x + w + 1): the full-image truck reaches width + 1, the reader clips it.
    truck = (out / "Annotations" / "000000000009.xml").read_text()
    assert "<xmax>65</xmax><ymax>49</ymax>" in truck
    # The data folder loads for every list with the M-OWODB split.
    split = load_task_split("owod")
    assert [r.image_id for r in load_voc_split(out, "t1_train", split)] == LISTS["t1_train"]
    test = load_voc_split(out, "all_task_test", split)
    assert len(test) == 3
    airplane = load_voc_split(out, "t2_train", split)[0]
    np.testing.assert_array_equal(airplane.boxes[0], [11, 8, 16, 16])
    assert not airplane.difficult.any()
    assert load_voc_split(out, "t4_train", split)[1].names == []  # an image without objects


def test_mowodb_from_archives_copy(prep, downloads, tmp_path):
    ref = tmp_path / "ref"
    assert prep.main([*folder_args(downloads), "--out", str(ref),
                      "--expect-counts", FAKE_COUNTS]) == 0
    out = tmp_path / "data" / "OWOD"
    assert prep.main([*archive_args(downloads), "--out", str(out), "--copy",
                      "--expect-counts", FAKE_COUNTS]) == 0
    extracted = tmp_path / "data" / "OWOD-archives"
    assert (extracted / "VOCtrainval_11-May-2012" / "VOCdevkit" / "VOC2012" / "JPEGImages"
            / "2007_000027.jpg").is_file()
    # Only what the layout needs was extracted: no masks, no caption files.
    assert not list(extracted.rglob("SegmentationClass"))
    assert not list(extracted.rglob("captions_train2017.json"))
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        names = sorted(p.name for p in (out / sub).iterdir())
        assert names == sorted(p.name for p in (ref / sub).iterdir())
        for n in names:
            a, b = out / sub / n, ref / sub / n
            assert not a.is_symlink() and a.is_file()
            assert a.read_bytes() == b.read_bytes()
    # Another run pointed at the same --extract-to reuses the archives extracted there.
    stamp = (extracted / "train2017").stat().st_mtime_ns
    assert prep.main([*archive_args(downloads), "--out", str(tmp_path / "again"),
                      "--extract-to", str(extracted), "--expect-counts", FAKE_COUNTS]) == 0
    assert not (tmp_path / "again-archives").exists()
    assert (extracted / "train2017").stat().st_mtime_ns == stamp
    link = tmp_path / "again" / "JPEGImages" / "000000000009.jpg"
    assert link.is_symlink() and extracted.resolve() in link.resolve().parents


def test_public_counts_are_the_default(prep, downloads, tmp_path, capsys):
    out = tmp_path / "OWOD"
    assert prep.main([*folder_args(downloads), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"error: {downloads['lists'] / 't1_train.txt'}: 3 ids, expected 16,551 (the public " \
           "list); a different or truncated list?" in err
    assert any("all_task_test.txt: 4 ids, expected 10,246" in line for line in err)
    assert len([e for e in err if "expected" in e]) == len(LISTS)
    assert err[-1] == f"error: {len(LISTS)} problems with the inputs; nothing written to {out}"
    assert not out.exists()


def test_missing_ids_one_line_each_and_capped(prep, downloads, tmp_path, capsys):
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, ids in LISTS.items():
        (lists / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    (lists / "t2_train.txt").write_text("000000000009\n000000999999\n\n2012_999999\n")
    bogus = [f"9{i:05d}" for i in range(25)]
    (lists / "wr1.txt").write_text("\n".join(bogus) + "\n")
    # An image without its annotation, an annotation without its image.
    extra = tmp_path / "voc" / "VOCdevkit" / "VOC2007"
    _voc(extra, "123456", [("cat", [1, 1, 9, 9])])
    _voc(extra, "654321", [("cat", [1, 1, 9, 9])])
    (extra / "Annotations" / "123456.xml").unlink()
    (extra / "JPEGImages" / "654321.jpg").unlink()
    (lists / "t4_ft.txt").write_text("000000000030\n123456\n654321\n")
    out = tmp_path / "OWOD"
    args = folder_args(downloads, lists)
    args[args.index("--voc2012"):args.index("--voc2012")] = [str(extra.parent)]
    counts = FAKE_COUNTS.replace("t2_train=2", "t2_train=3").replace("t4_ft=1", "t4_ft=3")
    assert prep.main([*args, "--out", str(out), "--expect-counts", counts]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "error: t2_train.txt:2: 000000999999: no annotation and no image" in err
    assert "error: t2_train.txt:4: 2012_999999: no annotation and no image" in err
    assert "error: t4_ft.txt:2: 123456: no annotation" in err
    assert "error: t4_ft.txt:3: 654321: no image" in err
    wr1 = [e for e in err if "wr1.txt" in e]
    assert len(wr1) == 21 and wr1[0] == "error: wr1.txt:1: 900000: no annotation and no image"
    assert wr1[-1] == "error: wr1.txt: 5 more ids without an annotation or an image"
    assert err[-1] == f"error: 25 problems with the inputs; nothing written to {out}"
    assert not out.exists() and not list(tmp_path.glob(".OWOD.*"))


def test_user_mistakes(prep, downloads, tmp_path, capsys):
    out = tmp_path / "OWOD"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert prep.main([*folder_args(downloads), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # A list missing, a bad --expect-counts, a folder that is not VOC, an id in two inputs.
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, ids in LISTS.items():
        if name != "t3_ft":
            (lists / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    new = tmp_path / "new"
    assert prep.main([*folder_args(downloads, lists), "--out", str(new),
                      "--expect-counts", "none"]) == 2
    assert f"error: --lists {lists}: no t3_ft.txt" in capsys.readouterr().err.splitlines()
    assert prep.main([*folder_args(downloads), "--out", str(new), "--expect-counts",
                      "t1_train=many"]) == 2
    assert "--expect-counts" in capsys.readouterr().err
    args = folder_args(downloads)
    args[args.index("--voc2012") + 1] = str(downloads["coco"])
    assert prep.main([*args, "--out", str(new)]) == 2
    err = capsys.readouterr().err
    assert "--voc2012" in err and "VOCdevkit/VOC2012" in err and err.count("\n") == 1
    dup = tmp_path / "dup" / "VOCdevkit" / "VOC2007"
    _voc(dup, "000005", [("cat", [1, 1, 9, 9])])
    args = folder_args(downloads)
    args[args.index("--voc2012"):args.index("--voc2012")] = [str(dup.parent)]
    assert prep.main([*args, "--out", str(new)]) == 2
    err = capsys.readouterr().err
    assert "'000005' is in both" in err and str(dup) in err
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"not a tar")
    args = folder_args(downloads)
    args[args.index("--voc2012") + 1] = str(bad)
    assert prep.main([*args, "--out", str(new)]) == 2
    assert "cannot extract" in capsys.readouterr().err
    assert not new.exists()
    with pytest.raises(SystemExit) as exc:
        prep.main(["mowodb", "--out", str(new)])
    assert exc.value.code == 2


def test_sowodb_with_owdetr_lists(prep, downloads, tmp_path, capsys):
    """S-OWODB: COCO only; OW-DETR's ``test`` list is also installed as all_task_test."""
    lists = tmp_path / "OWDETR" / "VOC2007" / "ImageSets"
    lists.mkdir(parents=True)
    coco_lists = {"t1_train": ["000000000009", "000000000025"], "t2_train": ["000000000025"],
                  "t2_ft": ["000000000009"], "t3_train": ["000000000025"],
                  "t3_ft": ["000000000025"], "t4_train": ["000000000030"],
                  "t4_ft": ["000000000030"], "test": ["000000000139", "000000000285"]}
    for name, ids in coco_lists.items():
        (lists / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    coco = downloads["coco"]
    args = ["sowodb", "--coco-train-images", str(coco / "train2017"),
            "--coco-val-images", str(coco / "val2017"),
            "--coco-annotations", str(coco / "annotations"),
            "--lists", str(tmp_path / "OWDETR" / "VOC2007")]
    out = tmp_path / "SOWOD"
    assert prep.main([*args, "--out", str(out)]) == 2  # OW-DETR's counts by default
    err = capsys.readouterr().err
    assert "t1_train.txt: 2 ids, expected 89,490" in err
    assert "test.txt: 2 ids, expected 4,952" in err
    assert prep.main([*args, "--out", str(out), "--expect-counts",
                      "t1_train=2,all_task_test=2"]) == 0
    assert "no all_task_val list" in capsys.readouterr().out
    main = out / "ImageSets" / "Main"
    assert (main / "all_task_test.txt").read_text() == (lists / "test.txt").read_text()
    assert (main / "test.txt").is_file()
    split = load_task_split("sowod")
    test = load_voc_split(out, "all_task_test", split)
    assert [r.names for r in test] == [["tvmonitor", "diningtable"], ["bear"]]
    assert not (out / "Annotations" / "2008_000002.xml").exists()


def test_voc_xml_file_name_option_keeps_the_default():
    r = ImageRecord("a", "/some/where/a.JPG", 10, 8, np.array([[1.4, 2.6, 9.5, 7]], np.float32),
                    ["cat"], np.array([True]))
    default = voc_xml(r)
    assert "<filename>a.JPG</filename>" in default and "<xmin>1</xmin><ymin>3</ymin>" in default
    assert voc_xml(r, file_name="a.jpg") == default.replace(
        "<filename>a.JPG</filename>", "<filename>a.jpg</filename>")
