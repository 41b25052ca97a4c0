"""The demo's open-world loop: the ground-truth labels it learns the reference task from,
the run branches that keep the original run untouched, and the figures and targets it
reports (checked against sums written out by hand)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from ore.data.classes import load_task_split
from ore.data.records import parse_voc_xml, read_image_list
from ore.demo.figures import gallery_excerpt
from ore.demo.loop import (
    branch_dir,
    ground_truth_labels,
    loop_figures,
    loop_targets,
    training_images,
)
from ore.engine.add_task import branch_run, read_labels, read_names
from ore.errors import OreError


def test_training_images_are_every_task_list_once(toy_root):
    split = load_task_split(toy_root / "classes.yaml")
    images = training_images(toy_root, split)
    ids = [i for t in range(1, 5)
           for i in read_image_list(toy_root / "ImageSets" / "Main" / f"t{t}_train.txt")]
    assert [p.stem for p in images] == list(dict.fromkeys(ids))
    assert all(p.is_file() for p in images)


def test_ground_truth_labels_hold_the_never_introduced_objects_only(toy_root, tmp_path):
    split = load_task_split(toy_root / "classes.yaml")
    images = training_images(toy_root, split)
    novel = split.never_introduced
    folder = ground_truth_labels(toy_root, images, novel, tmp_path / "gt")
    expected = {}
    for p in images:  # the naive count: every XML object of a never-introduced class
        names = parse_voc_xml(toy_root / "Annotations" / f"{p.stem}.xml", p).names
        kept = [n for n in names if n in novel]
        if kept:
            expected[p.stem] = sorted(kept)
    records = read_labels(folder)
    assert {r.image_id: sorted(r.names) for r in records} == expected and expected
    assert all(Path(r.file_name) == (toy_root / "JPEGImages" / f"{r.image_id}.jpg").resolve()
               for r in records)
    task = read_names(folder / "names.yaml", records, split)  # each class as itself
    assert set(task.classes) == set(novel) & {n for v in expected.values() for n in v}
    # Written once: a second call keeps the folder as it is.
    stamp = os.stat(folder / "names.yaml").st_mtime_ns
    assert ground_truth_labels(toy_root, images, novel, folder) == folder
    assert os.stat(folder / "names.yaml").st_mtime_ns == stamp


def _fake_run(root: Path) -> Path:
    (root / "t1_train").mkdir(parents=True)
    (root / "t1_train" / "model_final.pth").write_bytes(b"weights")
    (root / "summary.json").write_text(json.dumps({"t1": {"train": {"known_mAP_both": 50.0}}}))
    (root / "classes.yaml").write_text("tasks: [[a]]\n")
    (root / ".ore.lock").write_text("")
    return root


def test_a_branch_links_the_tasks_and_copies_what_add_task_rewrites(tmp_path):
    source = _fake_run(tmp_path / "run")
    branch = branch_run(source, tmp_path / "branch")
    assert (branch / "t1_train").is_symlink()
    assert (branch / "t1_train").resolve() == (source / "t1_train").resolve()
    assert not (branch / "summary.json").is_symlink()
    assert (branch / "summary.json").read_text() == (source / "summary.json").read_text()
    assert not (branch / ".ore.lock").exists()
    # What add-task writes into the branch leaves the source as it was.
    (branch / "summary.json").write_text("{}")
    (branch / "t2_train").mkdir()
    assert json.loads((source / "summary.json").read_text())["t1"]
    assert not (source / "t2_train").exists()
    assert branch_run(source, branch) == branch  # again: kept as it is
    assert (branch / "summary.json").read_text() == "{}"


def test_a_branch_refuses_a_foreign_folder_and_a_source_that_is_no_run(tmp_path):
    source = _fake_run(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OreError, match="is not a branch of"):
        branch_run(source, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    with pytest.raises(OreError, match="no summary.json"):
        branch_run(tmp_path / "empty", tmp_path / "b")


def _summary(folder: Path, task: str, stages: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({task: stages}))


def test_loop_figures_and_targets_from_the_summaries(tmp_path):
    split = load_task_split("toy")  # four tasks; spiral, hourglass, bolt never introduced
    run = tmp_path / "ore"
    _summary(run, "t4", {"train": {"known_mAP_both": 1.0}, "ft": {"known_mAP_both": 40.0},
                         "reported": "ft"})
    loop = tmp_path / "loop"
    ap_gt = {"spiral": 60.0, "hourglass": 50.0, "bolt": 40.0}
    ap_disc = {"spiral": 30.0, "hourglass": 45.0}  # bolt never learnt: AP counted as 0
    for name, ap, old in (("ground_truth", ap_gt, 38.0), ("discovered", ap_disc, 37.0)):
        _summary(branch_dir(loop, name, 5), "t5",
                 {"ft": {"per_class_ap": ap, "known_mAP_prev": old, "unknown_recall": 10.0},
                  "reported": "ft"})
    purity = {"members": 100, "overall_purity": 0.9,
              "clusters": [{"majority": "spiral"}, {"majority": "none"}, {"majority": "none"}],
              "coverage": {"spiral": {"objects": 10, "covered": 8, "coverage": 0.8},
                           "hourglass": {"objects": 20, "covered": 9, "coverage": 0.45},
                           "bolt": {"objects": 10, "covered": 3, "coverage": 0.3},
                           "circle": {"objects": 50, "covered": 50, "coverage": 1.0}}}
    r = loop_figures(loop, run, split, {"purity": purity}, {})
    d = r["discover"]
    assert (r["task"], r["old_mAP_before"], d["k"], d["members"]) == (5, 40.0, 3, 100)
    assert d["coverage_all"] == pytest.approx((8 + 9 + 3) / (10 + 20 + 10))  # known excluded
    assert d["majorities"] == ["spiral", "none", "none"]
    disc, gt = r["tasks"]["discovered"], r["tasks"]["ground_truth"]
    assert gt["new_mAP50"] == pytest.approx(50.0)
    assert disc["new_mAP50"] == pytest.approx((30 + 45 + 0) / 3)
    t = r["targets"]
    assert t["purity"] == {"value": 0.9, "min": 0.85, "pass": True}
    assert t["coverage"]["value"] == pytest.approx(0.5) and t["coverage"]["pass"] is False
    assert t["new_ap50_ratio"]["value"] == pytest.approx(25.0 / 50.0)
    assert t["new_ap50_ratio"]["pass"] is False
    assert t["old_map_kept"]["value"] == pytest.approx(37.0 / 40.0)
    assert t["old_map_kept"]["pass"] is True


def test_a_loop_that_learnt_nothing_fails_every_target_it_could_not_measure(tmp_path):
    split = load_task_split("toy")
    _summary(tmp_path / "ore", "t4", {"ft": {"known_mAP_both": 40.0}, "reported": "ft"})
    r = loop_figures(tmp_path / "loop", tmp_path / "ore", split,
                     {"error": "no detection labelled unknown in 3 images"},
                     {"discovered": "no detection labelled unknown in 3 images",
                      "ground_truth": "the task did not finish"})
    assert r["discover"]["error"].startswith("no detection")
    assert all(v["skipped"] for v in r["tasks"].values())
    targets = loop_targets(r)
    assert all(v["value"] is None and v["pass"] is False for v in targets.values())


def test_the_gallery_excerpt_keeps_the_rows_asked_for_in_order():
    tile, pad, k = 10, 4, 5
    sheet = np.full((pad + k * (tile + pad), 30, 3), 255, np.uint8)
    for r in range(k):  # row r painted grey level 40 r
        y = pad + r * (tile + pad)
        sheet[y:y + tile] = 40 * r
    ok, png = cv2.imencode(".png", sheet)
    jpg = gallery_excerpt(png.tobytes(), [3, 0, 9], tile, pad, quality=100)
    out = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert out.shape == (2 * (tile + pad) + pad, 30)  # row 9 does not exist
    for i, r in enumerate((3, 0)):
        y = pad + i * (tile + pad)
        assert abs(float(out[y + 2:y + tile - 2].mean()) - 40 * r) < 3
        assert float(out[y - pad + 1:y - 1].mean()) > 250  # the white gap above
