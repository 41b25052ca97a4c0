"""COCO-style AP (AP@[.5:.95], AP50, AP75) of the known classes through pycocotools.

Boxes go to COCO ``[x, y, w, h]`` as ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``
for ground truth and detections alike, so pycocotools' IoU (areas ``w·h``) equals the VOC
+1 IoU used everywhere else. Difficult objects become ``iscrowd = 1``, which pycocotools
ignores (it matches crowd regions by intersection over the detection's area, its own
rule). Unknown objects and unknown detections take no part. pycocotools keeps the 100
best detections per image and class (its ``maxDets``); the VOC figures use all of them.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ore.evaluation.metrics import Detections, GroundTruth


def _to_xywh(boxes: np.ndarray) -> np.ndarray:
    return np.stack(
        [boxes[:, 0] - 1, boxes[:, 1] - 1, boxes[:, 2] - boxes[:, 0] + 1,
         boxes[:, 3] - boxes[:, 1] + 1], axis=1,
    )


def coco_ap(gt: GroundTruth, dets: Detections, known: tuple[int, ...]) -> dict | None:
    """``{"AP", "AP50", "AP75"}`` in percent over the ``known`` labels, or None when no
    known object exists to evaluate against."""
    known_arr = np.asarray(known, np.int64)
    g = np.isin(gt.label, known_arr)
    if not g.any():
        return None
    gt_xywh = _to_xywh(gt.boxes[g])
    annotations = [
        {"id": k + 1, "image_id": int(img) + 1, "category_id": int(lab), "bbox": box.tolist(),
         "area": float(box[2] * box[3]), "iscrowd": int(crowd)}
        for k, (img, lab, box, crowd) in enumerate(
            zip(gt.image[g], gt.label[g], gt_xywh, gt.difficult[g])
        )
    ]
    dataset = {
        "images": [{"id": i + 1} for i in range(gt.num_images)],
        "categories": [{"id": int(c)} for c in known],
        "annotations": annotations,
    }
    d = np.isin(dets.label, known_arr)
    if not d.any():
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    results = np.concatenate(
        [dets.image[d, None] + 1.0, _to_xywh(dets.boxes[d]), dets.score[d, None],
         dets.label[d, None].astype(np.float64)], axis=1,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (float(x) for x in ev.stats[:3])
    return {k: (None if v < 0 else 100.0 * v) for k, v in
            (("AP", ap), ("AP50", ap50), ("AP75", ap75))}
