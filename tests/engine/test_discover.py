"""``ore discover``: the unknowns of a run clustered by their RoI features (silhouette and
purity against naive references, on synthetic blobs), and the gallery, the VOC and COCO
exports and the names file of one end-to-end run, as ore add-task reads them."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from pycocotools.coco import COCO

from ore.cli import main
from ore.data.classes import load_task_split
from ore.data.records import ImageRecord, load_voc_split
from ore.engine.add_task import read_labels, read_names
from ore.engine.discover import (
    CLUSTERS_FILE,
    Clustering,
    Unknowns,
    build_outputs,
    cluster_unknowns,
    purity_report,
    silhouette_score,
    write_outputs,
)
from tests.reliability import train_args, user_error


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny tensor operations: OpenMP threads that spin between them cost more than
    they give (the command line sets OMP_WAIT_POLICY=PASSIVE; a test run may not)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- naive references -------------------------------------------------------------------


def naive_silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    n, total = len(x), 0.0
    for i in range(n):
        d = [math.dist(x[i], x[j]) for j in range(n)]
        same = [d[j] for j in range(n) if j != i and labels[j] == labels[i]]
        if not same:
            continue  # s(i) = 0 for a point alone in its cluster
        a = sum(same) / len(same)
        b = min(sum(d[j] for j in range(n) if labels[j] == c) / sum(labels == c)
                for c in set(labels.tolist()) if c != labels[i])
        total += (b - a) / max(a, b)
    return total / n


def naive_iou(a, b) -> float:  # VOC convention, +1 sizes
    iw = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0)
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def naive_purity(image, boxes, assign, k, gt: list[ImageRecord]):
    member_cls, matched = [], set()
    for m in range(len(image)):
        r = gt[image[m]]
        best, best_iou = None, 0.5
        for g, box in enumerate(r.boxes.tolist()):
            iou = naive_iou([v + 1 for v in boxes[m]], box)
            if iou >= best_iou and (best is None or iou > best_iou):
                best, best_iou = g, iou
        member_cls.append("none" if best is None else r.names[best])
        if best is not None:
            matched.add((image[m], best))
    majority, agree = [], 0
    for c in range(k):
        counts = Counter(cls for cls, a in zip(member_cls, assign) if a == c)
        order = sorted(counts, key=lambda name: (-counts[name], name == "none", name))
        majority.append(order[0])
        agree += counts[order[0]]
    coverage = {}
    for name in sorted({n for r in gt for n in r.names}):
        objs = [(i, g) for i, r in enumerate(gt) for g, n in enumerate(r.names) if n == name]
        coverage[name] = sum(o in matched for o in objs) / len(objs)
    return majority, agree / len(image), coverage


# --- clustering and purity on synthetic features ----------------------------------------


def test_silhouette_matches_the_naive_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(11, 3))
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 0])  # cluster 3 holds one point
    got = silhouette_score(torch.tensor(x), torch.tensor(labels), chunk=4)
    assert got == pytest.approx(naive_silhouette(x, labels), abs=1e-9)
    # Averaged over some rows only: each row's s(i) is still taken against every point.
    rows = torch.tensor([1, 4, 9])
    one = [silhouette_score(torch.tensor(x), torch.tensor(labels), rows=torch.tensor([i]))
           for i in rows.tolist()]
    assert silhouette_score(torch.tensor(x), torch.tensor(labels), rows=rows) == \
        pytest.approx(sum(one) / 3, abs=1e-12)


def blobs(seed=0, sizes=(30, 20, 12), dim=16, noise=0.08):
    """Unit vectors around three orthogonal directions; the true blob of each."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    x = np.eye(dim)[truth] + noise * rng.normal(size=(len(truth), dim))
    perm = rng.permutation(len(truth))
    x, truth = x[perm], truth[perm]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def test_silhouette_picks_three_blobs_deterministically():
    x, truth = blobs()
    cl = cluster_unknowns(x, seed=1)
    assert cl.k == 3 and cl.criterion == "silhouette"
    assert sorted(cl.silhouette_by_k) == list(range(2, 13))
    assert max(cl.silhouette_by_k, key=cl.silhouette_by_k.get) == 3
    # Each cluster is one blob, the largest first.
    assert [set(truth[cl.assign == c]) for c in range(3)] == [{0}, {1}, {2}]
    assert np.bincount(cl.assign).tolist() == [30, 20, 12]
    # Distances are to the cluster's centroid, members sorted most typical first.
    assert np.allclose(cl.distance, np.linalg.norm(x - cl.centroids[cl.assign], axis=1),
                       atol=1e-5)
    m = cl.members(0)
    assert np.all(np.diff(cl.distance[m]) >= 0)
    again = cluster_unknowns(x, seed=1)
    assert np.array_equal(again.assign, cl.assign) and again.silhouette_by_k == \
        cl.silhouette_by_k
    given = cluster_unknowns(x, k=5, seed=1)
    assert given.k == 5 and given.criterion == "given" and set(given.silhouette_by_k) == {5}


def synthetic_scene(truth: np.ndarray, seed=0):
    """Images with ground truth: one object per detection (its box jittered by a pixel),
    classes a/b/c by blob, one detection on background per image, one unmatched object."""
    rng = np.random.default_rng(seed)
    n_img = 6
    image = rng.integers(0, n_img, len(truth))
    boxes = np.zeros((len(truth), 4))
    gt = []
    for i in range(n_img):
        idx = np.flatnonzero(image == i)
        xy = np.stack([40.0 * np.arange(len(idx)), np.full(len(idx), 10.0)], 1)
        boxes[idx] = np.concatenate([xy, xy + 30], 1)
        gt_boxes = boxes[idx] + 1 + rng.uniform(-1, 1, (len(idx), 4))
        names = ["abc"[t] for t in truth[idx]]
        if i == 0:  # an object no detection finds
            gt_boxes = np.concatenate([gt_boxes, [[300, 300, 330, 330]]])
            names.append("c")
        gt.append(ImageRecord(f"{i:02d}", f"{i:02d}.jpg", 400, 400,
                              gt_boxes.astype(np.float32), names,
                              np.zeros(len(names), bool)))
    return image, boxes, gt


def test_purity_of_blobs_is_full_and_matches_the_naive_count():
    x, truth = blobs()
    cl = cluster_unknowns(x, seed=1)
    image, boxes, gt = synthetic_scene(truth)
    rep = purity_report(image, boxes, cl.assign, cl.k, gt)
    assert rep["overall_purity"] == 1.0
    assert [c["majority"] for c in rep["clusters"]] == ["a", "b", "c"]
    assert rep["coverage"]["a"]["coverage"] == 1.0
    assert rep["coverage"]["c"] == {"objects": 13, "covered": 12,
                                    "coverage": round(12 / 13, 4)}


def test_purity_matches_the_naive_reference_on_random_boxes():
    rng = np.random.default_rng(5)
    n, k = 60, 4
    image = rng.integers(0, 5, n)
    xy = rng.uniform(0, 60, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], 1)
    assign = rng.integers(0, k, n)
    gt = []
    for i in range(5):
        # Most detections of the image sit on an object (a few pixels off), plus others.
        own = np.flatnonzero(image == i)
        own = own[rng.random(len(own)) < 0.7]
        m = int(rng.integers(2, 5))
        gxy = rng.uniform(0, 60, (m, 2))
        g = np.concatenate([boxes[own] + 1 + rng.uniform(-3, 3, (len(own), 4)),
                            np.concatenate([gxy, gxy + rng.uniform(5, 40, (m, 2))], 1)])
        names = [str(rng.choice(["cat", "dog", "eel"])) for _ in range(len(g))]
        gt.append(ImageRecord(str(i), f"{i}.jpg", 200, 200, g.astype(np.float32), names,
                              np.zeros(len(g), bool)))
    rep = purity_report(image, boxes, assign, k, gt)
    majority, overall, coverage = naive_purity(image, boxes, assign, k, gt)
    assert [c["majority"] for c in rep["clusters"]] == majority
    assert rep["overall_purity"] == pytest.approx(overall, abs=1e-4)
    assert {c: v["coverage"] for c, v in rep["coverage"].items()} == pytest.approx(
        coverage, abs=1e-4)
    assert 0 < overall < 1 and any(m != "none" for m in majority)


def test_majority_names_become_the_names_file_add_task_reads(tmp_path, toy_root):
    """Against ground truth, each cluster is named by its majority class; a class the run
    knows already, or no match, stays 'ignore'."""
    x, truth = blobs(sizes=(6, 5, 4))
    cl = cluster_unknowns(x, k=3, seed=0)
    files = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:3]
    image = np.arange(len(truth)) % 3
    boxes = np.tile([[10.0, 12.0, 40.0, 44.0]], (len(truth), 1)) + 45.0 * (
        np.arange(len(truth)) // 3)[:, None] % 150
    names = {0: "spiral", 1: "bolt", 2: "circle"}  # circle is a toy task-1 class
    gt = []
    for i in range(3):
        idx = np.flatnonzero(image == i)
        gt.append(ImageRecord(str(i), str(files[i]), 160, 160, (boxes[idx] + 1).astype(
            np.float32), [names[int(t)] for t in truth[idx]], np.zeros(len(idx), bool)))
    sizes = np.array([[160, 160]] * 3)
    unk = Unknowns(files, sizes, image, boxes.astype(np.float32),
                   np.full(len(truth), 0.5, np.float32), x)
    split = load_task_split("toy")
    out_files, summary, purity = build_outputs(unk, cl, gallery_per_cluster=2, ground_truth=gt,
                                               taken_classes=set(split.classes))
    write_outputs(tmp_path / "out", out_files, {})
    text = (tmp_path / "out" / "names.yaml").read_text()
    by_cluster = yaml.safe_load(text)
    majority = [c["majority"] for c in purity["clusters"]]
    assert sorted(majority) == ["bolt", "circle", "spiral"]
    assert [by_cluster[c["name"]] for c in purity["clusters"]] == [
        "ignore" if m == "circle" else m for m in majority]
    assert "already a class" in text
    labels = read_labels(tmp_path / "out" / "labels" / "voc")
    task = read_names(tmp_path / "out" / "names.yaml", labels, split)
    assert set(task.classes) == {"spiral", "bolt"}
    assert sum(len(r.names) for r in labels) == len(truth)
    # Two crops per cluster, in the gallery page and on disk.
    page = (tmp_path / "out" / "gallery.html").read_text()
    crops = sorted(p.relative_to(tmp_path / "out").as_posix()
                   for p in (tmp_path / "out" / "crops").rglob("*.jpg"))
    assert len(crops) == 6 and all(f'src="{c}"' in page for c in crops)
    assert json.loads((tmp_path / "out" / "purity.json").read_text()) == purity


def test_names_from_the_gallery_follow_the_crops_it_shows(tmp_path, toy_root):
    """A cluster whose most typical members are spirals but whose other members match no
    object is 'ignore' by all its members and 'spiral' by the crops its gallery shows."""
    files = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:1]
    boxes = np.array([[10, 10, 40, 40], [50, 10, 80, 40], [90, 90, 99, 99], [100, 90, 109, 99],
                      [110, 90, 119, 99], [120, 90, 129, 99], [10, 100, 40, 130]], np.float32)
    gt = [ImageRecord("0", str(files[0]), 160, 160,
                      np.array([[11, 11, 41, 41], [51, 11, 81, 41], [11, 101, 41, 131]],
                               np.float32), ["spiral", "spiral", "bolt"], np.zeros(3, bool))]
    n = len(boxes)
    assign = np.array([0, 0, 0, 0, 0, 0, 1])
    distance = np.array([0.1, 0.2, 0.5, 0.6, 0.7, 0.8, 0.1], np.float32)  # spirals first
    cl = Clustering(2, "given", {}, assign, distance, np.eye(2, 4, dtype=np.float32))
    unk = Unknowns(files, np.array([[160, 160]]), np.zeros(n, np.int64), boxes,
                   np.full(n, 0.5, np.float32), np.eye(n, 4, dtype=np.float32))
    for names_from, first in (("members", "ignore"), ("gallery", "spiral")):
        out_files, _, purity = build_outputs(unk, cl, gallery_per_cluster=2, ground_truth=gt,
                                             names_from=names_from)
        names = yaml.safe_load(out_files["names.yaml"].decode())
        assert names == {"cluster_00": first, "cluster_01": "bolt"}
        assert purity["clusters"][0]["majority"] == "none"  # all members: 4 of 6 unmatched
        assert purity["clusters"][0]["purity"] == pytest.approx(4 / 6, abs=1e-4)
    gallery = purity["gallery"]
    assert gallery["shown_per_cluster"] == 2
    assert [(c["majority"], c["size"]) for c in gallery["clusters"]] == [("spiral", 2),
                                                                         ("bolt", 1)]


def test_exports_take_any_image_name_and_format(tmp_path, toy_root):
    """Image ids become plain unique stems; a format the VOC reader does not find is
    copied as PNG, the others linked (lower-case extension)."""
    src = cv2.imread(str(next((toy_root / "JPEGImages").glob("*.jpg"))))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [tmp_path / "a" / "my photo.JPG", tmp_path / "b" / "my photo.webp",
             tmp_path / "b" / "x.tif"]
    for f in files:
        assert cv2.imwrite(str(f), src)
    x, _ = blobs(sizes=(3, 3))
    h, w = src.shape[:2]
    unk = Unknowns(files, np.array([[h, w]] * 3), np.array([0, 1, 2, 0, 1, 2]),
                   np.tile([[5.0, 6.0, 30.0, 40.0]], (6, 1)).astype(np.float32),
                   np.full(6, 0.3, np.float32), x)
    out_files, _, _ = build_outputs(unk, cluster_unknowns(x, k=2), gallery_per_cluster=1)
    write_outputs(tmp_path / "out", out_files, {})
    jpeg = tmp_path / "out" / "labels" / "voc" / "JPEGImages"
    assert sorted(p.name for p in jpeg.iterdir()) == ["my_photo.jpg", "my_photo_1.png", "x.png"]
    assert (jpeg / "my_photo.jpg").resolve() == files[0].resolve()
    assert not (jpeg / "x.png").is_symlink() and cv2.imread(str(jpeg / "x.png")).shape == \
        src.shape
    voc = load_voc_split(tmp_path / "out" / "labels" / "voc", "discovered")
    coco = read_labels(tmp_path / "out" / "labels" / "coco.json")
    assert [r.image_id for r in voc] == [r.image_id for r in coco] == [
        "my_photo", "my_photo_1", "x"]
    assert all(len(r.names) == 2 for r in voc)


# --- end to end on a tiny trained run -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, toy_root) -> Path:
    """A toy task-1 detector trained for two iterations (its unknowns are arbitrary)."""
    out = tmp_path_factory.mktemp("discover") / "run"
    assert main([str(a) for a in train_args(out, toy_root)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory, toy_root) -> Path:
    folder = tmp_path_factory.mktemp("imgs") / "imgs"
    folder.mkdir()
    for p in sorted((toy_root / "JPEGImages").glob("*.jpg"))[:5]:
        shutil.copy(p, folder / p.name)
    return folder


def discover(run, images, out, *args) -> int:
    return main([str(a) for a in ["discover", "--run", run, images, "--output", out,
                                  "--score-thresh", "0.0", *args]])


def test_end_to_end_outputs_load_in_pycocotools_the_voc_reader_and_add_task(
        tmp_path, tiny_run, images, toy_root, capsys):
    out = tmp_path / "out"
    assert discover(tiny_run, images, out, "--max-per-cluster-gallery", "3",
                    "--names-majority", toy_root) == 0
    assert "next: name the clusters" in capsys.readouterr().out
    summary = json.loads((out / CLUSTERS_FILE).read_text())
    k, clusters = summary["k"], summary["clusters"]
    n = sum(c["size"] for c in clusters)
    assert summary["criterion"] == "silhouette" and n == summary["clustered"] > 2
    assert summary["images"] == 5 and len(clusters) == k >= 2
    assert sorted(map(int, summary["silhouette_by_k"])) == list(range(2, min(12, n - 1) + 1))
    sil = {int(kk): v for kk, v in summary["silhouette_by_k"].items()}
    assert sil[k] == max(sil.values())
    assert [c["size"] for c in clusters] == sorted((c["size"] for c in clusters), reverse=True)
    for c in clusters:
        d = [m["distance"] for m in c["members"]]
        assert d == sorted(d) and c["spread"] == pytest.approx(np.mean(d), abs=1e-3)
        assert [m.get("crop") is not None for m in c["members"]] == [
            i < 3 for i in range(c["size"])]
        for m in c["members"][:3]:
            crop = cv2.imread(str(out / m["crop"]))
            assert crop is not None and crop.shape[0] == 96
    page = (out / "gallery.html").read_text()
    assert page.count("<section>") == k and "<script" not in page
    assert f"{clusters[0]['size']} crops, spread {clusters[0]['spread']:.3f}" in page
    sheet = cv2.imread(str(out / "gallery.png"))
    assert sheet is not None and sheet.shape[0] == k * 68 + 4

    # VOC: the project's reader (through the written list) and add-task's.
    voc = out / "labels" / "voc"
    records = load_voc_split(voc, "discovered")
    assert sum(len(r.names) for r in records) == n
    assert {name for r in records for name in r.names} == {c["name"] for c in clusters}
    assert all(Path(r.file_name).resolve().parent == images.resolve() for r in records)
    first = clusters[0]["members"][0]
    rec = next(r for r in records if r.image_id == Path(first["image"]).stem)
    want = np.rint(np.clip(np.array(first["box"]) + 1, 1, [rec.width, rec.height] * 2))
    assert any(np.array_equal(b, want) for b in rec.boxes)

    # COCO: pycocotools, file names relative to the JSON, bbox x, y, w, h.
    coco = COCO(str(out / "labels" / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [c["name"] for c in clusters]
    assert coco.getCatIds() == list(range(1, k + 1)) and len(coco.getAnnIds()) == n
    for im in coco.loadImgs(coco.getImgIds()):
        assert (out / "labels" / im["file_name"]).resolve().parent == images.resolve()
    x1, y1, x2, y2 = first["box"]
    img = next(i for i in coco.loadImgs(coco.getImgIds())
               if Path(i["file_name"]).stem == Path(first["image"]).stem)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]], catIds=[1]))
    assert any(np.allclose(a["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=0.02) for a in anns)
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in anns)

    # ore add-task reads both exports alike, and the names file once a cluster is named.
    from_voc, from_coco = read_labels(voc), read_labels(out / "labels" / "coco.json")
    assert sorted((r.image_id, sorted(r.names)) for r in from_voc) == \
        sorted((r.image_id, sorted(r.names)) for r in from_coco)
    names = yaml.safe_load((out / "names.yaml").read_text())
    assert list(names) == [c["name"] for c in clusters]
    assert set(names.values()) <= {"ignore", "spiral", "hourglass", "bolt"}
    named = tmp_path / "named.yaml"
    named.write_text((out / "names.yaml").read_text().replace(
        f"cluster_00: {names['cluster_00']}", "cluster_00: blob", 1))
    task = read_names(named, from_coco, load_task_split("toy"))
    assert "blob" in task.classes and task.of_cluster["cluster_00"] == "blob"
    purity = json.loads((out / "purity.json").read_text())
    assert [c["size"] for c in purity["clusters"]] == [c["size"] for c in clusters]

    # Same seed, same clusters; a rerun replaces discover's own files only.
    again = tmp_path / "again"
    assert discover(tiny_run, images, again, "--max-per-cluster-gallery", "3",
                    "--names-majority", toy_root) == 0
    assert (again / CLUSTERS_FILE).read_text() == (out / CLUSTERS_FILE).read_text()
    assert discover(tiny_run, images, out, "--k", "2", "--max-per-cluster-gallery", "1") == 0
    assert json.loads((out / CLUSTERS_FILE).read_text())["criterion"] == "given"
    assert not (out / "purity.json").exists()
    assert sorted(p.relative_to(out).as_posix() for p in (out / "crops").rglob("*")) == [
        "crops/cluster_00", "crops/cluster_00/000.jpg", "crops/cluster_01",
        "crops/cluster_01/000.jpg"]
    # An edited names file is never replaced.
    (out / "names.yaml").write_text("cluster_00: blob\n")
    err = user_error(capsys, ["discover", "--run", tiny_run, images, "--output", out,
                              "--score-thresh", "0.0"])
    assert "names.yaml has changed since ore discover wrote it" in err
    assert (out / "names.yaml").read_text() == "cluster_00: blob\n"


def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_run, images, capsys):
    base = ["discover", "--run", tiny_run, images, "--output", tmp_path / "o"]
    (tmp_path / "empty_run").mkdir()
    assert "no model_final.pth there nor in a stage folder" in user_error(
        capsys, ["discover", "--run", tmp_path / "empty_run", images, "--output", tmp_path / "o"])
    (tmp_path / "none").mkdir()
    assert "no images" in user_error(capsys, ["discover", "--run", tiny_run, tmp_path / "none",
                                              "--output", tmp_path / "o"])
    assert user_error(capsys, [*base, "--k", "1"]).endswith(
        "--k 1: expected an integer ≥ 2 (clusters of unknowns)")
    for bad in ("2-12", "1:5", "6:3", "a:b"):
        assert f"--k-range '{bad}': expected LOW:HIGH" in user_error(
            capsys, [*base, "--k-range", bad])
    assert "give one of them" in user_error(capsys, [*base, "--k", "3", "--k-range", "2:4"])
    for bad in ("1.0", "-0.1"):
        assert user_error(capsys, [*base, "--objectness", bad]) == (
            f"error: --objectness {float(bad)}: expected a whole-object score threshold in "
            "[0, 1) (0: off)")
    assert user_error(capsys, [*base, "--score-thresh", "1.0"]) == (
        "error: no detection labelled unknown in 5 images; lower --score-thresh or check the "
        "run's task")
    err = user_error(capsys, [*base, "--score-thresh", "0.0", "--k", "100000"])
    assert "--k 100000 is more than the" in err and "detections labelled unknown in 5 images" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "is not empty and was not written by ore discover" in user_error(
        capsys, ["discover", "--run", tiny_run, images, "--output", foreign])
    assert (foreign / "notes.txt").read_text() == "mine"
    assert "--names-majority" in user_error(capsys, [*base, "--names-majority", tmp_path])
    assert user_error(capsys, ["discover", "--run", tiny_run, images, "--output",
                               foreign / "notes.txt"]) == (
        f"error: --output: {foreign / 'notes.txt'} is a file; give a folder")
    assert not (tmp_path / "o").exists()
