"""Discovering new classes among the unknowns: the detections a run labels ``unknown``,
clustered by their RoI features, shown as a gallery and exported for labelling.

Shapes: I images read, n unknown detections kept, D feature width, k clusters, G
ground-truth objects. Boxes are 0-based ``x1, y1, x2, y2`` in the image's pixels (as the
detector returns them) except in the VOC export and the ground truth (VOC convention,
1-based inclusive: +1).

The embedding of a detection is the RoI box-head feature its classifier scored (the
feature the ORE head clusters around class prototypes in training), L2-normalised.
Clusters come from spherical k-means (:func:`ore.contrastive.clustering.kmeans`, the best
of several seeded restarts); k is given, or the one of a range with the highest mean
silhouette (:func:`silhouette_score`). Cluster 0 is the largest; members run from the most
typical (closest to the centroid) out.

The output folder (:data:`OUTPUTS`): ``clusters.json``, ``gallery.html`` with crops under
``crops/``, ``gallery.png``, ``labels/voc`` (``Annotations``, ``JPEGImages`` linked to the
images, ``ImageSets/Main/discovered.txt``) and ``labels/coco.json`` with objects named
``cluster_XX``, ``names.yaml`` (the names file of ``ore add-task``) and, against ground
truth, ``purity.json``. Every file is written atomically; ``.ore-discover.json`` lists what
discover wrote, so that a rerun replaces only its own, unchanged files and a folder
holding anything else (an edited ``names.yaml`` included) is refused.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ore.contrastive.clustering import kmeans
from ore.data.classes import UNKNOWN
from ore.data.images import UnreadableImage, decode_image
from ore.data.records import VOC_IMAGE_EXTENSIONS, ImageRecord, parse_voc_xml, voc_xml
from ore.engine.inference import Predictor
from ore.engine.objectness import STEPS as OBJECTNESS_STEPS
from ore.engine.objectness import score_boxes, train_objectness
from ore.errors import OreError
from ore.evaluation.metrics import voc_iou
from ore.fileio import (
    FILE_MODE,
    LOCK_FILE,
    atomic_write,
    atomic_write_json,
    folder_lock,
    read_json,
)

log = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.json"
GALLERY_HTML = "gallery.html"
GALLERY_PNG = "gallery.png"
CROPS_DIR = "crops"
VOC_DIR = "labels/voc"
COCO_FILE = "labels/coco.json"
NAMES_FILE = "names.yaml"
PURITY_FILE = "purity.json"
MANIFEST = ".ore-discover.json"
# Whose majority ground-truth class names a cluster (--names-from): all its members, or the
# crops its gallery row shows (what a person reviewing the gallery sees).
NAMES_FROM = ("members", "gallery")
OUTPUTS = (CLUSTERS_FILE, GALLERY_HTML, GALLERY_PNG, CROPS_DIR, VOC_DIR, COCO_FILE,
           NAMES_FILE, PURITY_FILE)
LIST_NAME = "discovered"  # labels/voc/ImageSets/Main/discovered.txt: the labelled images
IGNORE = "ignore"  # the names file's word for "stays unknown" (as ore add-task reads it)
NO_MATCH = "none"  # the ground-truth class of a member that overlaps no object
MATCH_IOU = 0.5
# A box under this many pixels on a side makes no crop anyone can name.
MIN_BOX_SIDE = 4.0
# Crops: the box with this share of its size added on each side, this high in pixels.
CROP_MARGIN = 0.1
CROP_HEIGHT = 96
SHEET_TILE = 64  # tile height on the gallery.png contact sheet
SHEET_PER_ROW = 12
K_RANGE = (2, 12)  # the default range of k searched by silhouette (capped at n - 1)
RESTARTS = 8  # seeded k-means restarts; the lowest inertia is kept
# Detections under this whole-object score are not clustered (0: no score).
DEFAULT_OBJECTNESS = 0.0
SILHOUETTE_ROWS = 4000  # points whose silhouettes are averaged (each against all n)
_SAFE_STEM = re.compile(r"[^\w.\-]")


def cluster_name(c: int) -> str:
    return f"cluster_{c:02d}"


# --- arguments --------------------------------------------------------------------------


def parse_k_range(text: str) -> tuple[int, int]:
    """``"2:12"`` → ``(2, 12)``; an :class:`OreError` unless ``2 ≤ LOW ≤ HIGH``."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    lo, hi = (int(m.group(1)), int(m.group(2))) if m else (0, -1)
    if not m or lo < 2 or hi < lo:
        raise OreError(f"--k-range {text!r}: expected LOW:HIGH, integers with 2 ≤ LOW ≤ HIGH "
                       "(e.g. 2:12)")
    return lo, hi


def check_k(k: int | None, k_range: tuple[int, int] | None) -> None:
    """The k options before any work: k ≥ 2, and not both of them."""
    if k is not None and k_range is not None:
        raise OreError("--k and --k-range: give one of them (a fixed k, or a range to choose "
                       "from by silhouette)")
    if k is not None and k < 2:
        raise OreError(f"--k {k}: expected an integer ≥ 2 (clusters of unknowns)")


def check_objectness(threshold: float) -> None:
    if not 0.0 <= threshold < 1.0:
        raise OreError(f"--objectness {threshold}: expected a whole-object score threshold "
                       "in [0, 1) (0: off)")


def load_ground_truth(root: str | Path, images: list[Path]) -> list[ImageRecord]:
    """The ground truth of each image from the VOC root ``root``: the annotation
    ``<root>/Annotations/<image stem>.xml`` (class names as written, no class split)."""
    root = Path(root)
    ann = root / "Annotations"
    if not ann.is_dir():
        raise OreError(f"--names-majority {root}: no Annotations/ folder (expected a VOC root "
                       "with the images' ground-truth XML)")
    missing = [p for p in images if not (ann / f"{p.stem}.xml").is_file()]
    if missing:
        raise OreError(f"--names-majority {root}: no annotation {ann / missing[0].stem}.xml "
                       f"for image {missing[0]} ({len(missing)} of {len(images)} images have "
                       "none)")
    return [parse_voc_xml(ann / f"{p.stem}.xml", p) for p in images]


# --- the unknown detections ---------------------------------------------------------------


@dataclass
class Unknowns:
    """The detections labelled ``unknown`` in a set of images, flattened.

    Attributes:
        images: the images read, in input order (unreadable ones left out).
        sizes: int64 [I, 2] height, width of each image.
        image: int64 [n] index into ``images`` of each detection.
        boxes: float32 [n, 4] 0-based xyxy pixels.
        scores: float32 [n] the unknown class's score.
        features: float32 [n, D] L2-normalised RoI features.
        unreadable: {"image", "error"} per input that could not be read.
        objectness: float32 [n] the whole-object score of each box, once scored
            (:func:`filter_whole_objects`), else None.
    """

    images: list[Path]
    sizes: np.ndarray
    image: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    unreadable: list[dict] = field(default_factory=list)
    objectness: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image)

    def take(self, index: np.ndarray) -> Unknowns:
        return Unknowns(self.images, self.sizes, self.image[index], self.boxes[index],
                        self.scores[index], self.features[index], self.unreadable,
                        None if self.objectness is None else self.objectness[index])


def check_discover_model(cfg) -> None:
    """Only the ORE head labels detections ``unknown`` and returns their features."""
    if cfg.MODEL.ROI_HEADS.NAME != "ore":
        raise OreError(f"MODEL.ROI_HEADS.NAME={cfg.MODEL.ROI_HEADS.NAME}: this detector never "
                       "labels a detection unknown; discover needs a run of the ORE head")


def _predict(predictor: Predictor, images: list[np.ndarray]) -> list[dict]:
    unknown = predictor.split.unknown_label
    found = []
    for det in predictor.predict(images, features=True):
        if det.features is None:
            raise OreError("the detector returns no RoI features; discover needs the ORE head")
        keep = det.labels == unknown
        features = F.normalize(torch.from_numpy(det.features[keep]), dim=-1).numpy()
        found.append({"boxes": det.boxes[keep], "scores": det.scores[keep],
                      "features": features})
    return found


def collect_unknowns(predictor: Predictor, paths: list[Path], batch_size: int = 4) -> Unknowns:
    """Run the detector over ``paths`` in batches and keep the detections labelled
    ``unknown`` (with EBUI on, those it relabels too). An unreadable image is skipped with
    a warning; none readable, or no unknown detection at all, is an :class:`OreError`."""
    max_pixels = predictor.cfg.INPUT.MAX_PIXELS
    images, sizes, unreadable = [], [], []
    per_image: list[dict] = []
    with tqdm(total=len(paths), desc="discover", unit="image") as bar:
        for s in range(0, len(paths), batch_size):
            chunk, decoded = [], []
            for p in paths[s:s + batch_size]:
                try:
                    decoded.append(decode_image(p, max_pixels))
                    chunk.append(p)
                except UnreadableImage as exc:
                    log.warning("skipping %s: %s", p, exc.reason)
                    unreadable.append({"image": str(p), "error": exc.reason})
            if decoded:
                per_image += _predict(predictor, decoded)
                images += chunk
                sizes += [im.shape[:2] for im in decoded]
            bar.update(len(paths[s:s + batch_size]))
    if not images:
        first = unreadable[0] if unreadable else None
        raise OreError(f"no readable image among the {len(paths)} inputs"
                       + (f" ({first['image']}: {first['error']})" if first else ""))
    counts = np.array([len(d["scores"]) for d in per_image], np.int64)
    if counts.sum() == 0:
        raise OreError(f"no detection labelled {UNKNOWN} in {len(images)} images; lower "
                       "--score-thresh or check the run's task")
    dim = next(d["features"].shape[1] for d in per_image if len(d["scores"]))
    return Unknowns(
        images=images, sizes=np.asarray(sizes, np.int64).reshape(-1, 2),
        image=np.repeat(np.arange(len(images)), counts),
        boxes=np.concatenate([d["boxes"] for d in per_image]).reshape(-1, 4).astype(np.float32),
        scores=np.concatenate([d["scores"] for d in per_image]).astype(np.float32),
        features=np.concatenate([d["features"].reshape(-1, dim) for d in per_image]),
        unreadable=unreadable)


def _dropped(unknowns: Unknowns, drop: np.ndarray, reason) -> list[dict]:
    """The ``unclustered`` entry of each detection where ``drop`` [n] is true;
    ``reason(i)`` says why detection i is left out."""
    return [{"image": str(unknowns.images[unknowns.image[i]]),
             "box": np.round(unknowns.boxes[i].astype(np.float64), 2).tolist(),
             "score": round(float(unknowns.scores[i]), 4), "reason": reason(i)}
            for i in np.flatnonzero(drop)]


def drop_unusable(unknowns: Unknowns) -> tuple[Unknowns, list[dict]]:
    """(the detections that are clustered, and each dropped one with its reason): a box
    under :data:`MIN_BOX_SIDE` pixels on a side gives no crop to name."""
    wh = unknowns.boxes[:, 2:] - unknowns.boxes[:, :2]  # [n, 2]
    tiny = (wh < MIN_BOX_SIDE).any(1)
    dropped = _dropped(unknowns, tiny, lambda i: f"box under {MIN_BOX_SIDE:g} pixels on a side")
    return unknowns.take(np.flatnonzero(~tiny)), dropped


def filter_whole_objects(unknowns: Unknowns, records: list[ImageRecord], threshold: float, *,
                         seed: int = 0, steps: int = OBJECTNESS_STEPS, max_pixels: int = 0
                         ) -> tuple[Unknowns, list[dict]]:
    """(the detections whose whole-object score is at least ``threshold``, each with its
    score, and each dropped one with its reason). The score is learnt from ``records``, the
    run's labelled training images (:mod:`ore.engine.objectness`)."""
    model = train_objectness(records, steps=steps, seed=seed, max_pixels=max_pixels)
    score = np.zeros(len(unknowns), np.float32)
    order = np.argsort(unknowns.image, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(unknowns.image[order]) != 0])
    for idx in tqdm(np.split(order, starts[1:]) if len(order) else [],
                    desc="whole-object score", unit="image"):
        image = decode_image(unknowns.images[unknowns.image[idx[0]]], max_pixels)
        score[idx] = score_boxes(model, image, unknowns.boxes[idx])
    scored = replace(unknowns, objectness=score)
    low = score < threshold
    dropped = _dropped(unknowns, low,
                       lambda i: f"whole-object score {score[i]:.3f} under {threshold:g}")
    return scored.take(np.flatnonzero(~low)), dropped


# --- clustering ---------------------------------------------------------------------------


def silhouette_score(x: torch.Tensor, labels: torch.Tensor, *, rows: torch.Tensor | None = None,
                     chunk: int = 2048) -> float:
    """Mean silhouette of a clustering under the Euclidean distance.

    For point i in cluster A: a(i) = the mean distance to the other points of A, b(i) =
    the smallest mean distance to the points of another cluster, s(i) = (b − a) / max(a,
    b), and s(i) = 0 when A holds i alone. Distances are computed ``chunk`` rows at a time
    and summed per cluster by a one-hot product, so memory stays at chunk × n.

    Args:
        x: [n, D] points.
        labels: [n] cluster of each point, 0..k-1, at least two clusters used.
        rows: indices of the points whose s(i) is averaged (default: all); their a and b
            are still taken over every point.
    """
    x = x.double()
    labels = labels.long()
    onehot = F.one_hot(labels).double()  # [n, k]
    counts = onehot.sum(0)  # [k]
    if int((counts > 0).sum()) < 2:
        raise ValueError("the silhouette needs at least two non-empty clusters")
    rows = torch.arange(len(x)) if rows is None else rows.long()
    s = torch.empty(len(rows), dtype=torch.float64)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        sums = torch.cdist(x[part], x) @ onehot  # [c, k] distance sums per cluster
        own = labels[part]
        own_n = counts[own]  # [c]
        a = sums.gather(1, own[:, None])[:, 0] / (own_n - 1).clamp_min(1)
        mean_other = sums / counts.clamp_min(1)
        mean_other[torch.arange(len(own)), own] = float("inf")
        mean_other[:, counts == 0] = float("inf")
        b = mean_other.min(1).values
        denom = torch.maximum(a, b)
        si = torch.where(denom > 0, (b - a) / denom.clamp_min(1e-300), torch.zeros_like(a))
        s[start:start + chunk] = torch.where(own_n > 1, si, torch.zeros_like(si))
    return float(s.mean())


@dataclass
class Clustering:
    """k clusters of n points: cluster 0 the largest (ties: the one whose first point
    comes first), ``distance`` each point's distance to its centroid."""

    k: int
    criterion: str  # "given" or "silhouette"
    silhouette_by_k: dict[int, float]
    assign: np.ndarray  # int64 [n]
    distance: np.ndarray  # float32 [n]
    centroids: np.ndarray  # float32 [k, D]

    def members(self, c: int) -> np.ndarray:
        """Indices of cluster ``c``'s points, the most typical first (ties: index)."""
        idx = np.flatnonzero(self.assign == c)
        return idx[np.argsort(self.distance[idx], kind="stable")]


def _kmeans_best(x: torch.Tensor, k: int, seed: int, restarts: int = RESTARTS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of unit vectors x [n, D]: of ``restarts`` seeded runs, the one of
    lowest inertia (the first of equal ones). Runs one at a time, so memory stays at one
    problem's."""
    best = None
    for r in range(restarts):
        c, a = kmeans(x, k, spherical=True, seed=seed * restarts + r, iters=50)  # [k, D], [n]
        sums = F.one_hot(a, k).float().T @ x  # [k, D] per-cluster sums of x
        fit = float((sums * c).sum())  # Σ x·c(x): inertia = 2n − 2·fit for unit vectors
        if best is None or fit > best[0]:
            best = (fit, c, a)
    return best[1], best[2]


def _ordered(x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor,
             k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clusters renumbered by size (largest first; ties: first point first), empty ones
    dropped; (assign [n], distance to centroid [n], centroids [k', D])."""
    counts = torch.bincount(assign, minlength=k)
    first = torch.full((k,), len(x), dtype=torch.long).scatter_reduce(
        0, assign, torch.arange(len(x)), "amin")
    used = [int(c) for c in torch.nonzero(counts > 0)[:, 0]]
    order = torch.tensor(sorted(used, key=lambda c: (-int(counts[c]), int(first[c]))))
    new_id = torch.full((k,), -1, dtype=torch.long)
    new_id[order] = torch.arange(len(order))
    new_assign = new_id[assign]
    cents = centroids[order]
    dist = (x - cents[new_assign]).norm(dim=1)
    return new_assign.numpy(), dist.float().numpy(), cents.float().numpy()


def _clustering(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, k: int, criterion: str,
                scores: dict[int, float]) -> Clustering:
    assign, dist, cents = _ordered(x, c, a, k)
    if len(cents) < k:
        log.warning("k-means left %d of %d clusters empty: %d clusters", k - len(cents), k,
                    len(cents))
    return Clustering(len(cents), criterion, scores, assign, dist, cents)


def cluster_unknowns(features: np.ndarray, *, k: int | None = None,
                     k_range: tuple[int, int] | None = None, seed: int = 0) -> Clustering:
    """Cluster unit feature vectors [n, D]: into ``k`` clusters, or into the k of
    ``k_range`` (default :data:`K_RANGE`; capped at n − 1) with the highest mean
    silhouette (ties: the smaller k). Over :data:`SILHOUETTE_ROWS` points the silhouette
    is averaged over that many of them, drawn once for every k. Deterministic for a seed."""
    n = len(features)
    x = torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32)
    rows = None
    if n > SILHOUETTE_ROWS:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=g)[:SILHOUETTE_ROWS].sort().values
    if k is not None:
        if not 2 <= k <= n:
            raise OreError(f"--k {k}: expected 2 ≤ k ≤ {n}, the number of unknown detections "
                           "clustered")
        c, a = _kmeans_best(x, k, seed)
        scores = {}
        if k < n and len(torch.unique(a)) > 1:
            scores[k] = silhouette_score(x, a, rows=rows)
        return _clustering(x, c, a, k, "given", scores)
    lo, hi = k_range or K_RANGE
    if n < 3 or lo > n - 1:
        raise OreError(f"{n} unknown detections: choosing k by silhouette needs k ≤ n − 1 = "
                       f"{n - 1}, and the range starts at {lo}; give --k ≤ {n} or a smaller "
                       "--k-range")
    hi = min(hi, n - 1)
    scores, fits = {}, {}
    for kk in range(lo, hi + 1):
        c, a = _kmeans_best(x, kk, seed)
        if len(torch.unique(a)) < 2:  # every point in one cluster: no silhouette
            continue
        scores[kk], fits[kk] = silhouette_score(x, a, rows=rows), (c, a)
    if not scores:
        raise OreError(f"the {n} unknown detections have identical features: no k in "
                       f"{lo}:{hi} separates them")
    best = max(scores, key=lambda kk: (scores[kk], -kk))
    return _clustering(x, *fits[best], best, "silhouette", scores)


# --- ground truth: purity and coverage ------------------------------------------------------


def purity_report(image: np.ndarray, boxes: np.ndarray, assign: np.ndarray, k: int,
                  ground_truth: list[ImageRecord], iou: float = MATCH_IOU) -> dict:
    """How well clusters of detections line up with ground-truth classes.

    A member (a clustered detection) takes the class of the ground-truth object of its
    image it overlaps most, if that IoU (VOC convention) is at least ``iou``, else
    :data:`NO_MATCH`. Per cluster: the counts of member classes, the majority class (ties:
    a real class before ``none``, then by name) and its share, the purity. Overall purity:
    the share of members whose class is their cluster's majority. Per ground-truth class:
    its objects in these images, how many some member matches, and that coverage.

    Args:
        image: int64 [n] index into ``ground_truth`` of each member's image.
        boxes: float [n, 4] 0-based xyxy pixels (the detector's boxes).
        assign: int64 [n] cluster of each member, 0..k-1.
        ground_truth: one record per image (VOC-convention boxes).
    """
    n = len(image)
    gt_image = np.concatenate([np.full(len(r.names), i) for i, r in enumerate(ground_truth)]
                              ).astype(np.int64) if ground_truth else np.zeros(0, np.int64)
    gt_boxes = np.concatenate([r.boxes.reshape(-1, 4) for r in ground_truth]).astype(
        np.float64) if ground_truth else np.zeros((0, 4))
    gt_names = [name for r in ground_truth for name in r.names]
    classes = sorted(set(gt_names))
    gt_cls = np.array([classes.index(c) for c in gt_names], np.int64)
    # Every (member, object of its image) pair: objects are grouped by image already.
    starts = np.searchsorted(gt_image, image, "left")
    ends = np.searchsorted(gt_image, image, "right")
    per = ends - starts  # [n]
    pair_member = np.repeat(np.arange(n), per)
    pair_gt = (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
               + np.repeat(starts, per)).astype(np.int64)
    ious = voc_iou(boxes.astype(np.float64)[pair_member] + 1.0, gt_boxes[pair_gt])
    ok = ious >= iou
    pair_member, pair_gt, ious = pair_member[ok], pair_gt[ok], ious[ok]
    order = np.lexsort((pair_gt, -ious, pair_member))  # best IoU first, then the first box
    pair_member, pair_gt = pair_member[order], pair_gt[order]
    members, first = np.unique(pair_member, return_index=True)
    matched_gt = np.full(n, -1, np.int64)
    matched_gt[members] = pair_gt[first]
    none = len(classes)
    member_cls = np.where(matched_gt >= 0, gt_cls[np.maximum(matched_gt, 0)], none)
    labels = [*classes, NO_MATCH]
    counts = np.zeros((k, none + 1), np.int64)
    np.add.at(counts, (assign, member_cls), 1)
    majority = counts.argmax(1)  # real classes first in order: ties go to them
    sizes = counts.sum(1)
    clusters = [{"name": cluster_name(c), "size": int(sizes[c]), "majority": labels[majority[c]],
                 "purity": round(float(counts[c, majority[c]] / max(sizes[c], 1)), 4),
                 "counts": {labels[j]: int(counts[c, j]) for j in np.flatnonzero(counts[c])}}
                for c in range(k)]
    covered = np.zeros(len(gt_names), bool)
    covered[matched_gt[matched_gt >= 0]] = True
    coverage = {}
    for j, name in enumerate(classes):
        of = gt_cls == j
        coverage[name] = {"objects": int(of.sum()), "covered": int(covered[of].sum()),
                          "coverage": round(float(covered[of].mean()), 4)}
    overall = float(counts[np.arange(k), majority].sum() / max(n, 1))
    return {"iou": iou, "members": int(n), "overall_purity": round(overall, 4),
            "clusters": clusters, "coverage": coverage}


# --- the outputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A symbolic link to write, to an absolute path."""

    target: str


def _digest(content: bytes | Link) -> str:
    if isinstance(content, Link):
        return "link:" + content.target
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _digest_of(path: Path) -> str:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _is_stale_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def check_discover_output(output: str | Path) -> dict[str, list[str]]:
    """Before any work: ``output`` is absent, empty, or an earlier discover's output whose
    files are all as discover wrote them. Returns what the earlier run wrote (path → the
    digests it may have), so that :func:`write_outputs` replaces exactly those files."""
    out = Path(output)
    if not out.is_dir() or not any(p.name != LOCK_FILE and not _is_stale_temp(p.name)
                                   for p in out.iterdir()):
        return {}
    manifest = out / MANIFEST
    refuse = "it is never replaced: choose another --output"
    if not manifest.is_file():
        raise OreError(f"--output: {out} is not empty and was not written by ore discover (no "
                       f"{MANIFEST}); {refuse}")
    data = read_json(manifest)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise OreError(f"--output: {manifest} was not written by ore discover; {refuse}")
    for dirpath, dirnames, filenames in os.walk(out):
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d not in links]
        for name in [*filenames, *links]:
            path = here / name
            rel = path.relative_to(out).as_posix()
            if rel in (MANIFEST, LOCK_FILE) or _is_stale_temp(name):
                continue
            if rel not in files:
                raise OreError(f"--output: {path} was not written by ore discover; {refuse}")
            if _digest_of(path) not in files[rel]:
                raise OreError(f"--output: {path} has changed since ore discover wrote it "
                               f"(copy it elsewhere first, e.g. an edited {NAMES_FILE}); "
                               f"{refuse}")
    return files


def _write_one(path: Path, content: bytes | Link) -> None:
    if isinstance(content, Link):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        os.symlink(content.target, tmp)
        os.replace(tmp, path)
    else:
        atomic_write(path, lambda f: f.write(content))


def write_outputs(output: str | Path, files: dict[str, bytes | Link],
                  previous: dict[str, list[str]]) -> None:
    """Write ``files`` (path relative to ``output`` → bytes or a :class:`Link`) and remove
    what the previous run wrote that is no longer part of the output. The manifest is
    written first with the old and the new digest of each path, so a run stopped midway
    leaves a folder a rerun still recognises."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.rglob(".*.tmp"):  # left by a run that was killed
        if p.is_file() or p.is_symlink():
            p.unlink()
    new = {rel: _digest(c) for rel, c in files.items()}
    pending = {rel: sorted({*previous.get(rel, []), *([new[rel]] if rel in new else [])})
               for rel in {*previous, *new}}
    atomic_write_json(out / MANIFEST, {"written_by": "ore discover", "files": pending})
    for rel, content in files.items():
        _write_one(out / rel, content)
    for rel in sorted(set(previous) - set(files)):
        path = out / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        parent = path.parent
        while parent != out and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    atomic_write_json(out / MANIFEST, {"written_by": "ore discover",
                                       "files": {rel: [d] for rel, d in new.items()}})
    os.chmod(out / MANIFEST, FILE_MODE)


def _export_ids(images: list[Path]) -> list[str]:
    """A plain, unique file stem per image (letters, digits, '_', '-', '.'), as image
    lists and ore add-task need them."""
    ids, taken = [], set()
    for p in images:
        stem = _SAFE_STEM.sub("_", p.stem) or "image"
        name, k = stem, 1
        while name in taken:
            name, k = f"{stem}_{k}", k + 1
        taken.add(name)
        ids.append(name)
    return ids


def _crop(image: np.ndarray, box: np.ndarray, height: int) -> np.ndarray:
    """The box with a margin, clipped to the image, resized to ``height`` pixels (width
    by the aspect ratio, within a quarter and four times the height)."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box.astype(np.float64)
    mx, my = CROP_MARGIN * (x2 - x1) + 2, CROP_MARGIN * (y2 - y1) + 2
    x1, y1 = int(max(0, np.floor(x1 - mx))), int(max(0, np.floor(y1 - my)))
    x2, y2 = int(min(w, np.ceil(x2 + mx))), int(min(h, np.ceil(y2 + my)))
    patch = image[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
    width = int(np.clip(round(patch.shape[1] * height / patch.shape[0]), height // 4, 4 * height))
    interp = cv2.INTER_AREA if patch.shape[0] > height else cv2.INTER_LINEAR
    return cv2.resize(patch, (width, height), interpolation=interp)


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise OreError("cannot encode a crop as JPEG (OpenCV)")
    return data.tobytes()


def _contact_sheet(rows: list[tuple[list[str], list[np.ndarray]]]) -> bytes:
    """gallery.png: per cluster a header (text lines) and its crops, ``SHEET_TILE`` high."""
    pad, head_w = 4, 210
    tiles = [[cv2.resize(c, (max(1, round(c.shape[1] * SHEET_TILE / c.shape[0])), SHEET_TILE),
                         interpolation=cv2.INTER_AREA) for c in crops[:SHEET_PER_ROW]]
             for _, crops in rows]
    width = head_w + max((sum(t.shape[1] + pad for t in row) for row in tiles), default=0) + pad
    sheet = np.full(((SHEET_TILE + pad) * len(rows) + pad, max(width, head_w + pad), 3), 255,
                    np.uint8)
    for r, ((lines, _), row) in enumerate(zip(rows, tiles)):
        y = pad + r * (SHEET_TILE + pad)
        for j, text in enumerate(lines[:4]):
            cv2.putText(sheet, text, (6, y + 16 + 15 * j), cv2.FONT_HERSHEY_SIMPLEX,
                        0.45 if j else 0.5, (20, 20, 20), 1, cv2.LINE_AA)
        x = head_w
        for t in row:
            sheet[y:y + SHEET_TILE, x:x + t.shape[1]] = t
            x += t.shape[1] + pad
    ok, data = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OreError("cannot encode gallery.png (OpenCV)")
    return data.tobytes()


_PAGE_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
section{margin:0 0 1.5em}h2{font-size:1.05em;margin:.2em 0}h2 span{font-weight:normal;color:#555}
.row{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;font-size:.75em;color:#555}
figure img{display:block;height:96px;border:1px solid #ccc}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}code{background:#f3f3f3}"""


def _gallery_html(summary: dict, purity: dict | None, shown: dict[int, list[dict]]) -> str:
    e = html.escape
    k = summary["k"]
    how = ("given (--k)" if summary["criterion"] == "given"
           else "the highest mean silhouette")
    sil = "".join(f"<tr><td>{kk}</td><td>{v:.3f}</td></tr>"
                  for kk, v in summary["silhouette_by_k"].items())
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>ore discover: {k} clusters of unknowns</title><style>{_PAGE_STYLE}"
             "</style></head><body>",
             f"<h1>{k} clusters of {summary['clustered']} unknown detections</h1>",
             f"<p>{summary['images']} images; k by {how}. Crops run from the most typical "
             "detection of a cluster (closest to its centroid) out; spread is the mean "
             "distance of its members to the centroid. Name the clusters in "
             f"<code>{NAMES_FILE}</code>, then learn them with <code>ore add-task</code>.</p>"]
    if sil:
        parts.append(f"<table><tr><th>k</th><th>silhouette</th></tr>{sil}</table>")
    for c, cl in enumerate(summary["clusters"]):
        extra = ""
        if purity is not None:
            p = purity["clusters"][c]
            extra = f", majority {e(p['majority'])} ({100 * p['purity']:.0f}%)"
        parts.append(f"<section><h2>{e(cl['name'])} <span>{cl['size']} crops, spread "
                     f"{cl['spread']:.3f}{extra}</span></h2><div class=\"row\">")
        for m in shown[c]:
            tip = e(f"{m['image']} score {m['score']:.3f} distance {m['distance']:.3f}")
            parts.append(f"<figure><img src=\"{e(m['crop'])}\" alt=\"\" title=\"{tip}\">"
                         f"<figcaption>{m['distance']:.3f}</figcaption></figure>")
        more = cl["size"] - len(shown[c])
        parts.append("</div>" + (f"<p>… and {more} more in {CLUSTERS_FILE}</p>" if more > 0
                                 else "") + "</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _yaml_scalar(name: str) -> str:
    return name if re.fullmatch(r"[a-z][\w\-]*", name) else json.dumps(name)


def names_template(sizes: list[int], names: list[str] | None = None,
                   notes: list[str] | None = None, output: str | Path = ".") -> str:
    """The names file of ``ore add-task``: one ``cluster_XX: <name>`` line per cluster
    (``ignore`` unless ``names`` says otherwise), its size as a comment; the header says
    how to go on, with the paths under ``output``."""
    out = Path(output)
    lines = [f"# What each cluster of {out / GALLERY_HTML} is: 'cluster_03: new_class', or",
             f"# '{IGNORE}' to keep its objects unknown (clusters given one name become one "
             "class). Then:",
             f"#   ore add-task --run RUN --labels {out / VOC_DIR} --names {out / NAMES_FILE}"]
    for c, size in enumerate(sizes):
        name = names[c] if names else IGNORE
        note = f"; {notes[c]}" if notes and notes[c] else ""
        lines.append(f"{cluster_name(c)}: {_yaml_scalar(name)}  # {size} crops{note}, see "
                     f"{GALLERY_HTML}")
    return "\n".join(lines) + "\n"


def majority_names(purity: dict, taken: set[str], of: str = "") -> tuple[list[str], list[str]]:
    """Each cluster's majority ground-truth class as its name (``ignore`` for ``none``
    and for a class the run has already), and a note per cluster saying so; ``of`` says
    whose majority it is (e.g. " of the crops shown")."""
    names, notes = [], []
    for p in purity["clusters"]:
        m, pct = p["majority"], f"{100 * p['purity']:.0f}%"
        share = pct + of
        if m == NO_MATCH:
            names.append(IGNORE)
            notes.append(f"{pct}{of or ' of them'} match no object")
        elif m in taken:
            names.append(IGNORE)
            notes.append(f"majority {m} ({share}) is already a class of the run")
        else:
            names.append(m)
            notes.append(f"majority {m} ({share})")
    return names, notes


def _export_image(path: Path, image_id: str) -> tuple[str, bytes | Link]:
    """The JPEGImages entry of an image: a link to it for the extensions the VOC reader
    finds, a PNG copy of any other image."""
    suffix = path.suffix.lower()  # the readers look for lower-case extensions
    if suffix in VOC_IMAGE_EXTENSIONS:
        return f"{image_id}{suffix}", Link(str(path.resolve()))
    img = decode_image(path)
    ok, data = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OreError(f"cannot re-encode {path} as PNG (OpenCV)")
    return f"{image_id}.png", data.tobytes()


def build_outputs(unknowns: Unknowns, clustering: Clustering, *, gallery_per_cluster: int = 20,
                  dropped: list[dict] = (), ground_truth: list[ImageRecord] | None = None,
                  taken_classes: set[str] = frozenset(), max_pixels: int = 0,
                  output: str | Path = ".", names_from: str = "members"
                  ) -> tuple[dict[str, bytes | Link], dict, dict | None]:
    """Every output file's contents (path under ``output`` → bytes or link), the
    ``clusters.json`` summary and the purity report (None without ground truth). With
    ground truth, ``names_from`` says whose majority names a cluster: all its
    ``members``, or the crops the ``gallery`` shows (the purity report then holds theirs
    under ``"gallery"``)."""
    k = clustering.k
    members = [clustering.members(c) for c in range(k)]
    files: dict[str, bytes | Link] = {}
    shown_idx = {c: m[:gallery_per_cluster] for c, m in enumerate(members)}
    purity = None
    if ground_truth is not None:
        purity = purity_report(unknowns.image, unknowns.boxes, clustering.assign, k,
                               ground_truth)
        if names_from == "gallery":
            rows = np.concatenate([*shown_idx.values(), np.zeros(0, np.int64)])
            shown = purity_report(unknowns.image[rows], unknowns.boxes[rows],
                                  clustering.assign[rows], k, ground_truth)
            purity["gallery"] = {"shown_per_cluster": gallery_per_cluster,
                                 "clusters": shown["clusters"]}
    # Crops of the members shown, each image decoded once.
    shown_set = np.zeros(len(unknowns), bool)
    shown_set[np.concatenate([*shown_idx.values(), np.zeros(0, np.int64)])] = True
    crops: dict[int, np.ndarray] = {}
    for im in np.unique(unknowns.image[shown_set]).tolist():
        rgb = decode_image(unknowns.images[im], max_pixels)
        for i in np.flatnonzero(shown_set & (unknowns.image == im)).tolist():
            crops[i] = _crop(rgb, unknowns.boxes[i], CROP_HEIGHT)

    def member(i: int) -> dict:
        return {"image": str(unknowns.images[unknowns.image[i]]),
                "box": np.round(unknowns.boxes[i].astype(np.float64), 2).tolist(),
                "score": round(float(unknowns.scores[i]), 4),
                "distance": round(float(clustering.distance[i]), 4),
                **({} if unknowns.objectness is None
                   else {"objectness": round(float(unknowns.objectness[i]), 4)})}

    clusters, shown, sheet_rows = [], {}, []
    for c, m in enumerate(members):
        entries = [member(int(i)) for i in m]
        shown[c] = []
        for rank, i in enumerate(shown_idx[c]):
            rel = f"{CROPS_DIR}/{cluster_name(c)}/{rank:03d}.jpg"
            files[rel] = _jpeg(crops[int(i)])
            entries[rank]["crop"] = rel
            shown[c].append(entries[rank])
        spread = float(clustering.distance[m].mean()) if len(m) else 0.0
        clusters.append({"name": cluster_name(c), "size": int(len(m)),
                         "spread": round(spread, 4), "members": entries})
        lines = [cluster_name(c), f"{len(m)} crops", f"spread {spread:.3f}"]
        if purity is not None:
            p = purity["clusters"][c]
            lines.append(f"{p['majority']} {100 * p['purity']:.0f}%")
        sheet_rows.append((lines, [crops[int(i)] for i in shown_idx[c]]))
    summary = {"k": k, "criterion": clustering.criterion,
               "silhouette_by_k": {str(kk): round(v, 4)
                                   for kk, v in clustering.silhouette_by_k.items()},
               "images": len(unknowns.images), "clustered": len(unknowns),
               "clusters": clusters, "unclustered": list(dropped)}
    if unknowns.unreadable:
        summary["unreadable"] = list(unknowns.unreadable)
    files[CLUSTERS_FILE] = (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode()
    files[GALLERY_HTML] = _gallery_html(summary, purity, shown).encode()
    files[GALLERY_PNG] = _contact_sheet(sheet_rows)
    files.update(_label_exports(unknowns, clustering))
    names, notes = None, None
    if purity is not None and "gallery" in purity:
        names, notes = majority_names(purity["gallery"], set(taken_classes),
                                      " of the crops shown")
    elif purity is not None:
        names, notes = majority_names(purity, set(taken_classes))
    files[NAMES_FILE] = names_template([c["size"] for c in clusters], names, notes,
                                       output).encode()
    if purity is not None:
        files[PURITY_FILE] = (json.dumps(purity, indent=2, allow_nan=False) + "\n").encode()
    return files, summary, purity


def _label_exports(unknowns: Unknowns, clustering: Clustering) -> dict[str, bytes | Link]:
    """labels/voc (Annotations, JPEGImages, ImageSets/Main/discovered.txt) and
    labels/coco.json: the images with a clustered detection, objects named by cluster."""
    files: dict[str, bytes | Link] = {}
    with_members = np.unique(unknowns.image)
    ids = _export_ids([unknowns.images[i] for i in with_members])
    coco_images, coco_anns = [], []
    categories = [{"id": c + 1, "name": cluster_name(c), "supercategory": UNKNOWN}
                  for c in range(clustering.k)]
    for n, (im, image_id) in enumerate(zip(with_members.tolist(), ids)):
        path = unknowns.images[im]
        h, w = (int(v) for v in unknowns.sizes[im])
        idx = np.flatnonzero(unknowns.image == im)
        idx = idx[np.lexsort((idx, clustering.assign[idx]))]
        boxes = unknowns.boxes[idx].astype(np.float64)  # 0-based
        voc = np.clip(boxes + 1.0, 1.0, [w, h, w, h])  # VOC convention
        names = [cluster_name(int(c)) for c in clustering.assign[idx]]
        file_name, content = _export_image(path, image_id)
        files[f"{VOC_DIR}/JPEGImages/{file_name}"] = content
        record = ImageRecord(image_id=image_id, file_name=str(path), width=w, height=h,
                             boxes=voc.astype(np.float32), names=names,
                             difficult=np.zeros(len(idx), bool))
        files[f"{VOC_DIR}/Annotations/{image_id}.xml"] = voc_xml(record,
                                                                 file_name=file_name).encode()
        coco_images.append({"id": n + 1, "file_name": f"voc/JPEGImages/{file_name}",
                            "width": w, "height": h})
        xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1), 2)
        coco_anns += [{"id": len(coco_anns) + j + 1, "image_id": n + 1,
                       "category_id": int(c) + 1, "bbox": b,
                       "area": round(b[2] * b[3], 2), "iscrowd": 0}
                      for j, (c, b) in enumerate(zip(clustering.assign[idx], xywh.tolist()))]
    files[f"{VOC_DIR}/ImageSets/Main/{LIST_NAME}.txt"] = "".join(f"{i}\n" for i in ids).encode()
    coco = {"images": coco_images, "annotations": coco_anns, "categories": categories}
    files[COCO_FILE] = (json.dumps(coco, indent=2, allow_nan=False) + "\n").encode()
    return files


def discover(predictor: Predictor, paths: list[Path], output: str | Path, *,
             k: int | None = None, k_range: tuple[int, int] | None = None, seed: int = 0,
             batch_size: int = 4, gallery_per_cluster: int = 20,
             ground_truth_root: str | Path | None = None, objectness: float = 0.0,
             objectness_records: list[ImageRecord] | None = None,
             objectness_steps: int = OBJECTNESS_STEPS, names_from: str = "members") -> dict:
    """Detect, cluster the unknowns and write the output folder (module docstring).
    With ``objectness`` > 0, only detections whose whole-object score (learnt from
    ``objectness_records``, the run's labelled training images) reaches it are clustered.
    Returns the ``clusters.json`` summary, with ``purity`` when ground truth is given.
    Inputs and the output folder are checked before the detector runs."""
    check_k(k, k_range)
    check_objectness(objectness)
    if names_from not in NAMES_FROM:
        raise OreError(f"--names-from {names_from!r}: expected one of {', '.join(NAMES_FROM)}")
    if objectness > 0 and not objectness_records:
        raise OreError("the whole-object score needs the run's labelled training images")
    if gallery_per_cluster < 1:
        raise OreError(f"--max-per-cluster-gallery {gallery_per_cluster}: expected ≥ 1")
    paths = list(dict.fromkeys(Path(p) for p in paths))  # an image named twice counts once
    check_discover_output(output)
    gt_all = load_ground_truth(ground_truth_root, paths) if ground_truth_root else None
    found = collect_unknowns(predictor, paths, batch_size)
    kept, dropped = drop_unusable(found)
    n_images = len(found.images)
    if objectness > 0 and len(kept):
        kept, low = filter_whole_objects(kept, objectness_records, objectness, seed=seed,
                                         steps=objectness_steps,
                                         max_pixels=predictor.cfg.INPUT.MAX_PIXELS)
        dropped = [*dropped, *low]
    if len(kept) == 0:
        raise OreError(f"no detection labelled {UNKNOWN} in {n_images} images is usable "
                       f"({len(dropped)} dropped, e.g. {dropped[-1]['reason']}); lower "
                       "--score-thresh" + (" or --objectness" if objectness > 0 else "")
                       + " or check the run's task")
    if k is not None and k > len(kept):
        raise OreError(f"--k {k} is more than the {len(kept)} detections labelled {UNKNOWN} "
                       f"in {n_images} images; choose --k ≤ {len(kept)}")
    clustering = cluster_unknowns(kept.features, k=k, k_range=k_range, seed=seed)
    gt = None
    if gt_all is not None:
        by_path = {str(p): r for p, r in zip(paths, gt_all)}
        gt = [by_path[str(p)] for p in kept.images]
    files, summary, purity = build_outputs(
        kept, clustering, gallery_per_cluster=gallery_per_cluster, dropped=dropped,
        ground_truth=gt, taken_classes=set(predictor.split.classes), names_from=names_from,
        max_pixels=predictor.cfg.INPUT.MAX_PIXELS, output=output)
    with folder_lock(output):  # a second discover into the folder waits its turn
        write_outputs(output, files, check_discover_output(output))
    return {**summary, **({"purity": purity} if purity is not None else {})}
