"""A straightforward per-class, per-detection evaluator: the test and benchmark oracle.

Written from the same definitions as :mod:`ore.evaluation.metrics` (SPEC §5) in the style
of the public reference code: for every class, a dict of per-image ground truth, the
detections ranked by score, then one Python iteration per detection computing IoUs
against that image's boxes and flipping a ``det`` flag. Deliberately slow; do not use it
to evaluate anything large. It returns exactly the dict of
:func:`ore.evaluation.metrics.summarise`, so the two can be compared key by key.
"""

from __future__ import annotations

import numpy as np

from ore.evaluation.metrics import (
    ClassCurve,
    Detections,
    GroundTruth,
    Protocol,
    summarise,
    voc_iou,
)


def _voc_ap_loop(rec, prec, method):
    if method == "11point":
        total = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            total = total + p
        return float(total / 11.0)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return min(float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])), 1.0)


def naive_curves(gt: GroundTruth, dets: Detections, protocol: Protocol) -> dict:
    """Same output as :func:`ore.evaluation.metrics.compute_curves`, one detection at a time."""
    # Ground truth per image, once for all classes (as the reference's parse cache).
    recs: dict[int, list[dict]] = {i: [] for i in range(gt.num_images)}
    for k in range(len(gt.label)):
        recs[int(gt.image[k])].append(
            {"label": int(gt.label[k]), "bbox": gt.boxes[k], "difficult": bool(gt.difficult[k]),
             "uid": k}
        )
    u = protocol.unknown
    thr = protocol.iou_threshold

    def class_recs(label):
        out, npos = {}, 0
        for image, objects in recs.items():
            objs = [o for o in objects if o["label"] == label]
            difficult = np.array([o["difficult"] for o in objs], bool)
            npos += int((~difficult).sum())
            out[image] = {
                "bbox": np.array([o["bbox"] for o in objs], np.float64).reshape(-1, 4),
                "difficult": difficult,
                "det": [False] * len(objs),
                "uid": [o["uid"] for o in objs],
            }
        return out, npos

    def best(R, bb):
        if R["bbox"].size == 0:
            return -np.inf, -1
        overlaps = voc_iou(bb[None, :], R["bbox"])
        return np.max(overlaps), int(np.argmax(overlaps))

    unknown_recs, _ = class_recs(u)
    curves, a_ose = {}, 0
    found_as_unknown, found_as_known = set(), set()
    for label in (*protocol.seen, u):
        R_all, npos = class_recs(label)
        idx = [i for i in range(len(dets)) if dets.label[i] == label]
        idx.sort(key=lambda i: (-dets.score[i], dets.image[i], *dets.boxes[i]))
        nd = len(idx)
        tp, fp, is_unk = np.zeros(nd), np.zeros(nd), np.zeros(nd)
        for d, i in enumerate(idx):
            R = R_all[int(dets.image[i])]
            bb = dets.boxes[i].astype(float)
            ovmax, jmax = best(R, bb)
            if ovmax > thr:
                if not R["difficult"][jmax]:
                    if not R["det"][jmax]:
                        tp[d] = 1.0
                        R["det"][jmax] = True
                        if label == u:
                            found_as_unknown.add(R["uid"][jmax])
                    else:
                        fp[d] = 1.0
            else:
                fp[d] = 1.0
        if label != u:
            for d, i in enumerate(idx):
                RU = unknown_recs[int(dets.image[i])]
                ovmax, jmax = best(RU, dets.boxes[i].astype(float))
                if ovmax > thr:
                    is_unk[d] = 1.0
                    if not RU["difficult"][jmax]:
                        found_as_known.add(RU["uid"][jmax])
            a_ose += int(np.sum(is_unk))
        curves[label] = ClassCurve(np.cumsum(tp), np.cumsum(fp), np.cumsum(is_unk), npos)
    _, n_unknown = class_recs(u)
    return {
        "curves": curves,
        "a_ose": a_ose,
        "tp_unknown": len(found_as_unknown),
        "fn_star": len(found_as_known - found_as_unknown),
        "n_unknown": n_unknown,
    }


def naive_metrics(gt: GroundTruth, dets: Detections, protocol: Protocol) -> dict:
    """The figures of :func:`ore.evaluation.metrics.open_world_metrics`, computed naively."""
    raw = naive_curves(gt, dets, protocol)
    result = summarise(raw, protocol)
    # Recompute AP with the reference's loop form, to check the vectorised envelope too.
    names = protocol.names
    for c, curve in raw["curves"].items():
        if curve.npos:
            ap = 100.0 * _voc_ap_loop(curve.recall, curve.precision, protocol.ap_method)
            result["per_class_ap"][names[c]] = ap
    aps = result["per_class_ap"]

    def mean(labels):
        values = [aps[names[c]] for c in labels if aps[names[c]] is not None]
        return float(np.mean(values)) if values else None

    result["known_mAP_prev"] = mean(protocol.previous)
    result["known_mAP_current"] = mean(protocol.current)
    result["known_mAP_both"] = mean(protocol.seen)
    result["unknown_ap"] = aps[names[protocol.unknown]]
    result["wilderness_impact"] = {
        f"{r / 10:.1f}": _wi_loop(raw["curves"], protocol.seen, r / 10) for r in range(1, 10)
    }
    return result


def _wi_loop(curves, seen, recall_level):
    tp_plus_fps, fps = [], []
    for c in seen:
        curve = curves[c]
        rec = curve.recall
        if len(rec) > 0 and curve.npos > 0:
            index = min(range(len(rec)), key=lambda i: abs(rec[i] - recall_level))
            tp_plus_fps.append(curve.tp[index] + curve.fp[index])
            fps.append(curve.fp_open_set[index])
    if not tp_plus_fps:
        return 0.0
    if np.mean(tp_plus_fps) == 0:
        return None
    return float(np.mean(fps) / np.mean(tp_plus_fps))
