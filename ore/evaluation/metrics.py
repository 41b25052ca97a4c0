"""Open-world detection metrics (SPEC §5), vectorised with numpy.

Shapes: G ground-truth objects, D detections, P (detection, ground-truth) pairs that share
an image and a label, K classes. Boxes are float64 ``xmin, ymin, xmax, ymax`` in the VOC
pixel convention (1-based, inclusive corners: a box's width is ``xmax - xmin + 1``).

The matching rules are the PASCAL VOC ones the reference used, reproduced exactly:

- detections of a class are ranked by score (ties: image index, then box corners, so the
  result never depends on the order detections arrive in);
- each detection looks only at its best-IoU ground-truth box of the same class in its
  image (the first such box on ties), among *all* of them, matched or not;
- IoU > 0.5 with a box that is difficult: the detection is ignored (neither TP nor FP);
  with a box not yet claimed by a higher-ranked detection: TP; otherwise FP.

Because a detection's best box does not depend on the matching state, "claimed by a
higher-ranked detection" is "not the first eligible detection of that box in rank order",
which a single ``np.unique(..., return_index=True)`` answers for every class at once.
Costs: one lexsort of D, two binary searches of D into G, O(P) for the IoUs, then O(D)
per metric: O(D log D) overall, with no Python loop over detections.

Images listed more than once (``GroundTruth.repeats``) are counted as the reference's
per-line loop counts them (SPEC §9): an image listed n times adds its objects n times to
the positives, and each of its detections takes part n times, as n identical rows.
The claims on its objects are shared, as in the reference (one ``det`` flag per image
name): at most one of the n copies of a detection is a TP, the others are FPs, and every
copy of a known-class detection on an unknown object counts for A-OSE and WI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AP_METHODS = ("allpoint", "11point")
RECALL_LEVELS = tuple(i / 10 for i in range(1, 10))  # WI is reported at 0.1 … 0.9


@dataclass
class GroundTruth:
    """Ground-truth objects of a set of images, flattened.

    Attributes:
        image: int64 [G] index of each object's image in the evaluated image list.
        label: int64 [G] 1..K for a seen class, K+1 for ``unknown``.
        boxes: float64 [G, 4] VOC convention.
        difficult: bool [G]; ignored for AP/recall (never a positive, never penalised).
        num_images: number of images evaluated (including images without objects).
        repeats: int64 [num_images] lines of the evaluated list that name each image, or
            None (each image once). See the module docstring for how repeats count.
    """

    image: np.ndarray
    label: np.ndarray
    boxes: np.ndarray
    difficult: np.ndarray
    num_images: int
    repeats: np.ndarray | None = None


@dataclass
class Detections:
    """Detections, flattened: image int64 [D], label int64 [D], score float64 [D],
    boxes float64 [D, 4] (VOC convention, already shifted when they came from a model)."""

    image: np.ndarray
    label: np.ndarray
    score: np.ndarray
    boxes: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64),
                   np.zeros((0, 4), np.float64))

    def __len__(self) -> int:
        return len(self.score)

    def take(self, index: np.ndarray) -> Detections:
        return Detections(self.image[index], self.label[index], self.score[index],
                          self.boxes[index])


@dataclass(frozen=True)
class Protocol:
    """Which labels play which part in task t, and how AP is computed.

    Attributes:
        names: label index → name (index 0 background, 1..K classes, K+1 unknown).
        previous: labels of the classes introduced before task t.
        current: labels of the classes introduced in task t.
        unknown: the unknown label (K+1).
        ap_method: ``allpoint`` (the reference; default) or ``11point`` (VOC2007 metric,
            OW-DETR/PROB-style numbers).
        iou_threshold: a match needs IoU strictly greater than this.
    """

    names: tuple[str, ...]
    previous: tuple[int, ...]
    current: tuple[int, ...]
    unknown: int
    ap_method: str = "allpoint"
    iou_threshold: float = 0.5

    def __post_init__(self):
        if self.ap_method not in AP_METHODS:
            raise ValueError(f"ap_method {self.ap_method!r}: expected one of {AP_METHODS}")

    @property
    def seen(self) -> tuple[int, ...]:
        return self.previous + self.current


# --------------------------------------------------------------------------- primitives


def voc_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Element-wise IoU of two [P, 4] box arrays in the VOC pixel convention (+1 sizes).

    The operations are in the reference's order so that results agree to the last bit.
    """
    iw = np.maximum(np.minimum(gt[:, 2], det[:, 2]) - np.maximum(gt[:, 0], det[:, 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gt[:, 3], det[:, 3]) - np.maximum(gt[:, 1], det[:, 1]) + 1.0, 0.0)
    inters = iw * ih
    union = (
        (det[:, 2] - det[:, 0] + 1.0) * (det[:, 3] - det[:, 1] + 1.0)
        + (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0)
        - inters
    )
    return inters / union


def voc_ap(rec: np.ndarray, prec: np.ndarray, method: str = "allpoint") -> float:
    """Average precision (a fraction) from a ranked list's recall and precision.

    ``allpoint``: area under the precision envelope (precision made non-increasing from the
    right) at every recall step. ``11point``: mean of the envelope's maximum at recall
    ≥ 0, 0.1, …, 1 (0 where the recall is never reached).
    """
    if method == "11point":
        # Suffix maximum: envelope[i] = max(prec[i:]); rec is non-decreasing.
        envelope = np.maximum.accumulate(prec[::-1])[::-1] if len(prec) else prec
        # The reference's 11 thresholds, float for float (0.30000000000000004 …).
        i = np.searchsorted(rec, np.arange(0.0, 1.1, 0.1), side="left")
        # Sum then divide (the reference added p/11 eleven times: 1.0000000000000002).
        if not len(rec):
            return 0.0
        p = np.where(i < len(rec), envelope[np.minimum(i, len(rec) - 1)], 0.0)
        return float(np.cumsum(p)[-1] / 11.0)  # cumsum: left to right, like a plain loop
    if method != "allpoint":
        raise ValueError(f"AP method {method!r}: expected one of {AP_METHODS}")
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    # The recall steps telescope to 1; rounding can overshoot by an ulp: cap at 1.
    return min(float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])), 1.0)


def best_match(
    det_key: np.ndarray, det_boxes: np.ndarray, gt_key: np.ndarray, gt_boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, its best-IoU ground-truth box among those with the same key.

    Args:
        det_key: int64 [D] group key of each detection (label × num_images + image).
        det_boxes: float64 [D, 4].
        gt_key: int64 [G] group keys, sorted (stably, so annotation order is kept within
            a group: on equal IoU the first box wins, as ``np.argmax`` in the reference).
        gt_boxes: float64 [G, 4], in ``gt_key`` order.

    Returns:
        ovmax: float64 [D] best IoU (``-inf`` when the group has no box).
        jmax: int64 [D] index into ``gt_key`` of that box (-1 when none).
    """
    d = len(det_key)
    ovmax = np.full(d, -np.inf)
    jmax = np.full(d, -1, np.int64)
    # Chunks keep the temporaries cache-sized, so the cost stays linear in D.
    for s in range(0, d, _CHUNK):
        e = min(s + _CHUNK, d)
        ovmax[s:e], jmax[s:e] = _best_match_chunk(det_key[s:e], det_boxes[s:e], gt_key,
                                                  gt_boxes)
    return ovmax, jmax


_CHUNK = 1 << 16


def _best_match_chunk(det_key, det_boxes, gt_key, gt_boxes):
    d = len(det_key)
    lo = np.searchsorted(gt_key, det_key, side="left")
    counts = np.searchsorted(gt_key, det_key, side="right") - lo
    starts = np.cumsum(counts) - counts  # first pair of each detection
    p = int(counts.sum())
    ovmax = np.full(d, -np.inf)
    jmax = np.full(d, -1, np.int64)
    if p == 0:
        return ovmax, jmax
    pair_det = np.repeat(np.arange(d), counts)  # [P]
    pair_gt = np.repeat(lo - starts, counts) + np.arange(p)  # [P]
    iou = voc_iou(det_boxes[pair_det], gt_boxes[pair_gt])  # [P]
    has = counts > 0
    seg = starts[has]
    ovmax[has] = np.maximum.reduceat(iou, seg)
    # First pair of each segment that attains the maximum.
    first = np.minimum.reduceat(np.where(iou == ovmax[pair_det], np.arange(p), p), seg)
    jmax[has] = pair_gt[np.minimum(first, p - 1)]  # (p only if the IoU was NaN: unmatched)
    return ovmax, jmax


def rank_order(dets: Detections) -> np.ndarray:
    """Permutation grouping detections by label, each group by descending score.

    Ties are broken by image index and then box corners, so equal inputs in any order give
    the same ranking (fully identical detections are interchangeable).
    """
    # Two stable argsorts (score, then label: a radix sort for small ints) cost far less
    # than one lexsort over all seven keys, whose random gathers dominate at 1M rows.
    order = np.argsort(-dets.score, kind="stable")
    label = dets.label[order]
    if len(label) and 0 <= label.min() and label.max() < 2**15:
        label = label.astype(np.int16)
    order = order[np.argsort(label, kind="stable")]
    label, score = dets.label[order], dets.score[order]
    tie = (label[1:] == label[:-1]) & (score[1:] == score[:-1])  # [D-1] tie with the next
    if tie.any():
        # Only tied runs need the remaining keys: sort those rows by (run, image, box).
        run = np.concatenate(([0], np.cumsum(~tie)))
        tied = np.zeros(len(order), bool)
        tied[1:] |= tie
        tied[:-1] |= tie
        pos = np.flatnonzero(tied)
        sub = order[pos]
        b = dets.boxes[sub]
        order[pos] = sub[np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], dets.image[sub],
                                     run[pos]))]
    return order


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else None


def _num(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


# --------------------------------------------------------------------------- the metrics


@dataclass
class ClassCurve:
    """The ranked list of one class: cumulative counts at every rank (float64 [n])."""

    tp: np.ndarray
    fp: np.ndarray
    fp_open_set: np.ndarray  # detections so far that overlap an unknown object
    npos: int

    @property
    def recall(self) -> np.ndarray:
        if self.npos == 0:
            return np.full(len(self.tp), np.nan)
        return self.tp / float(self.npos)

    @property
    def precision(self) -> np.ndarray:
        return self.tp / np.maximum(self.tp + self.fp, np.finfo(np.float64).eps)


def compute_curves(gt: GroundTruth, dets: Detections, protocol: Protocol) -> dict:
    """Match every detection once and build each class's cumulative curves.

    Detections whose label is neither seen nor unknown must have been removed already.

    Returns a dict with ``curves`` (label → :class:`ClassCurve`, for every seen label and
    unknown), ``a_ose`` (int), ``tp_unknown`` (int: unknown objects detected as unknown),
    ``fn_star`` (int: other non-difficult unknown objects that are the best match of a
    known-class detection), ``n_unknown`` (non-difficult unknown objects).
    """
    n_img = max(gt.num_images, 1)
    u = protocol.unknown
    thr = protocol.iou_threshold

    gt_key_raw = gt.label * n_img + gt.image
    gt_order = np.argsort(gt_key_raw, kind="stable")
    gt_key = gt_key_raw[gt_order]
    gt_boxes = gt.boxes[gt_order]
    gt_difficult = gt.difficult[gt_order]

    if gt.repeats is not None:  # an image listed n times: each detection n times
        dets = dets.take(np.repeat(np.arange(len(dets)), gt.repeats[dets.image]))
    dets = dets.take(rank_order(dets))

    # Own-class matching: TP / FP / ignored for every detection of every class at once.
    ovmax, jmax = best_match(dets.label * n_img + dets.image, dets.boxes, gt_key, gt_boxes)
    hit = ovmax > thr
    ignored = np.zeros(len(dets), bool)
    ignored[hit] = gt_difficult[jmax[hit]]
    eligible = np.flatnonzero(hit & ~ignored)
    tp = np.zeros(len(dets), bool)
    _, first = np.unique(jmax[eligible], return_index=True)
    tp[eligible[first]] = True
    fp = ~tp & ~ignored

    # Known-class detections against unknown objects (difficult ones included, as the
    # reference): A-OSE, WI's open-set false positives, and FN*_u for UDR/UDP.
    known = np.flatnonzero(dets.label != u)
    ov_u, j_u = best_match(u * n_img + dets.image[known], dets.boxes[known], gt_key, gt_boxes)
    is_unk = np.zeros(len(dets), bool)
    is_unk[known] = ov_u > thr

    # Segments of the label-sorted detections; cumulative sums restart at each segment.
    labels = (*protocol.seen, u)
    bounds = np.searchsorted(dets.label, np.asarray(labels), side="left")
    ends = np.searchsorted(dets.label, np.asarray(labels), side="right")
    counted = ~gt.difficult
    if gt.repeats is None:
        npos = np.bincount(gt.label[counted], minlength=u + 1)
    else:  # an image listed n times: its objects n times
        npos = np.bincount(gt.label[counted], weights=gt.repeats[gt.image[counted]],
                           minlength=u + 1).astype(np.int64)
    curves = {}
    for c, s, e in zip(labels, bounds, ends):
        curves[c] = ClassCurve(
            tp=np.cumsum(tp[s:e], dtype=np.float64),
            fp=np.cumsum(fp[s:e], dtype=np.float64),
            fp_open_set=np.cumsum(is_unk[s:e], dtype=np.float64),
            npos=int(npos[c]),
        )

    s, e = bounds[-1], ends[-1]
    found_as_unknown = np.unique(jmax[s:e][tp[s:e]])
    as_known = np.unique(j_u[ov_u > thr])
    as_known = as_known[~gt_difficult[as_known]]
    fn_star = int(len(np.setdiff1d(as_known, found_as_unknown, assume_unique=True)))
    return {
        "curves": curves,
        "a_ose": int(is_unk.sum()),
        "tp_unknown": int(len(found_as_unknown)),
        "fn_star": fn_star,
        "n_unknown": int(npos[u]),
    }


def wilderness_impact(curves: dict[int, ClassCurve], seen: tuple[int, ...], r: float):
    """WI at recall ``r``: mean over seen classes of the open-set FPs up to the rank whose
    recall is closest to ``r`` (first such rank), over the mean number of detections
    counted (TP + FP) up to that rank. Classes without detections or positives are left
    out; with no class left WI is 0 (the reference's value)."""
    fps, counted = [], []
    for c in seen:
        curve = curves[c]
        if len(curve.tp) == 0 or curve.npos == 0:
            continue
        i = int(np.argmin(np.abs(curve.recall - r)))
        fps.append(curve.fp_open_set[i])
        counted.append(curve.tp[i] + curve.fp[i])
    if not counted:
        return 0.0
    denominator = float(np.mean(counted))
    return float(np.mean(fps)) / denominator if denominator > 0 else float("nan")


def summarise(raw: dict, protocol: Protocol) -> dict:
    """Turn matched curves into the reported figures (percent; WI a fraction; None when
    undefined)."""
    curves: dict[int, ClassCurve] = raw["curves"]
    names = protocol.names
    u = protocol.unknown
    ap, recall, precision = {}, {}, {}
    for c, curve in curves.items():
        n = len(curve.tp)
        if curve.npos == 0:
            ap[c] = recall[c] = float("nan")
        else:
            ap[c] = 100.0 * voc_ap(curve.recall, curve.precision, protocol.ap_method)
            recall[c] = 100.0 * curve.recall[-1] if n else 0.0
        precision[c] = 100.0 * curve.precision[-1] if n else 0.0

    tp_u, fn_star, n_u = raw["tp_unknown"], raw["fn_star"], raw["n_unknown"]
    return {
        "per_class_ap": {names[c]: _num(ap[c]) for c in curves},
        "known_mAP_prev": _mean([ap[c] for c in protocol.previous]),
        "known_mAP_current": _mean([ap[c] for c in protocol.current]),
        "known_mAP_both": _mean([ap[c] for c in protocol.seen]),
        "unknown_recall": _num(recall[u]),
        "unknown_ap": _num(ap[u]),
        "unknown_precision": _num(precision[u]),
        "wilderness_impact": {
            f"{r:.1f}": _num(wilderness_impact(curves, protocol.seen, r)) for r in RECALL_LEVELS
        },
        "a_ose": int(raw["a_ose"]),
        "udr": _num(100.0 * (tp_u + fn_star) / n_u) if n_u else None,
        "udp": _num(100.0 * tp_u / (tp_u + fn_star)) if tp_u + fn_star else None,
        "per_class_recall": {names[c]: _num(recall[c]) for c in curves},
        "per_class_precision": {names[c]: _num(precision[c]) for c in curves},
        "num_positives": {names[c]: curves[c].npos for c in curves},
        "num_detections": {names[c]: len(curves[c].tp) for c in curves},
    }


def open_world_metrics(gt: GroundTruth, dets: Detections, protocol: Protocol) -> dict:
    """Every VOC-style figure of SPEC §5 (COCO AP aside) for detections of seen classes
    and ``unknown``. See :func:`summarise` for the keys."""
    return summarise(compute_curves(gt, dets, protocol), protocol)
