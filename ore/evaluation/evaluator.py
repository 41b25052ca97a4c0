"""The open-world evaluator: ``reset()`` / ``process(inputs, outputs)`` / ``evaluate()``.

Shapes: N detections of one image; K classes in the split; label layout of SPEC §2
(0 background, 1..K classes in task order, K+1 ``unknown``).

Example::

    # test_records: once per listed line (ore.data.records.as_listed); the model still
    # runs once per image: process() takes each image id once.
    ev = OpenWorldEvaluator(split=load_task_split("owod"), task=2, records=test_records)
    ev.reset()
    for inputs, outputs in batches:          # model boxes are 0-based: shifted by +1 here
        ev.process(inputs, outputs)
    result = ev.evaluate()                   # the keys of RESULT_KEYS
    print(format_table(result))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ore.data.classes import UNKNOWN, TaskSplit
from ore.data.records import ImageRecord
from ore.errors import OreError
from ore.evaluation.coco import coco_ap
from ore.evaluation.metrics import (
    AP_METHODS,
    Detections,
    GroundTruth,
    Protocol,
    open_world_metrics,
)

log = logging.getLogger(__name__)

# How a list that names an image more than once is counted: every listed line, as the
# published figures (SPEC §9), or every image once.
PROTOCOLS = ("listed-lines", "unique-images")


def protocol_name(unique_images: bool) -> str:
    """The name of the protocol that counts each image once (or every listed line)."""
    return PROTOCOLS[1] if unique_images else PROTOCOLS[0]

# The top-level keys of evaluate()'s result and of the JSON file, in print order.
RESULT_KEYS = (
    "protocol", "listed_lines", "unique_images",
    "known_mAP_prev", "known_mAP_current", "known_mAP_both",
    "unknown_recall", "unknown_ap", "unknown_precision",
    "wilderness_impact", "a_ose", "udr", "udp", "coco", "per_class_ap",
)
# Extra keys returned by evaluate(details=True) (for the table; not in the JSON file).
DETAIL_KEYS = ("per_class_recall", "per_class_precision", "num_positives", "num_detections")


def _to_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch is not imported here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class OpenWorldEvaluator:
    """Evaluates detections of seen classes and ``unknown`` on one task's test records.

    Figures (SPEC §5): per-class AP50 and known mAP over the previously known, current and
    all seen classes; unknown recall, precision and AP50; Wilderness Impact at recall
    0.1…0.9; A-OSE; UDR/UDP; COCO AP/AP50/AP75 of the known classes. AP, mAP, recall,
    precision, UDR and UDP in percent; WI a fraction; A-OSE an int. A figure that is
    undefined is ``None`` (JSON ``null``): ``known_mAP_prev`` in task 1 (no previously
    known class), AP/recall of a class without positives (left out of the means), unknown
    figures without unknown objects, UDP without any unknown object found.

    Choices where the reference is silent or odd, and what we do:

    - A-OSE and WI's open-set false positives count overlaps with *every* unknown object,
      difficult ones included, as the reference does.
    - WI divides by the mean number of detections counted as TP or FP up to the chosen
      rank (= rank + 1 unless some were ignored on difficult objects), as the reference.
    - UDR = (TP_u + FN*_u) / (all non-difficult unknown objects) and UDP =
      TP_u / (TP_u + FN*_u) (Zhao et al.): TP_u = unknown objects matched by unknown
      detections; FN*_u = the other non-difficult unknown objects that are the best match
      (IoU > 0.5) of some known-class detection.
    - Detections of a class not yet introduced at ``task`` are dropped with a warning.
    - An image id repeated in ``records`` is a list that names the image again. By default
      (protocol ``listed-lines``) every line counts, as the reference's per-line loop
      counted the public test list (10,246 lines, 9,119 images) for every published
      figure: the image's objects count once per line, and its detections, given once,
      take part once per line (see :mod:`ore.evaluation.metrics`). ``unique_images``
      (protocol ``unique-images``) counts each image once. The first record of an id is
      used; COCO AP always counts each image once.

    Args:
        split: the class split (class names and tasks).
        task: the current task, 1-based.
        records: the test images, already relabelled for the test role (objects of classes
            not seen at ``task`` named ``unknown``; any other unseen name is treated so too).
        ap: ``allpoint`` (reference) or ``11point``.
        coco: also compute COCO AP with pycocotools (slow for very large sets); when
            false, ``coco`` is None.
        unique_images: count each image once however often ``records`` names it.
        list_name: what ``records`` came from, for the notice logged when ids repeat.
    """

    def __init__(
        self, *, split: TaskSplit, task: int, records: Sequence[ImageRecord],
        ap: str = "allpoint", coco: bool = True, unique_images: bool = False,
        list_name: str = "the evaluated list",
    ):
        if ap not in AP_METHODS:
            raise OreError(f"AP method {ap!r}: expected one of {AP_METHODS}")
        split.check_task(task)
        self.split, self.task, self.ap, self.coco = split, task, ap, coco
        self.protocol_name = protocol_name(unique_images)
        self.num_lines = len(records)
        self.protocol = Protocol(
            names=split.label_names,
            previous=tuple(split.label(c) for c in split.previous(task)),
            current=tuple(split.label(c) for c in split.introduced(task)),
            unknown=split.unknown_label,
            ap_method=ap,
        )
        self._index: dict[str, int] = {}
        self.gt = self._ground_truth(records)
        notice = self.protocol_notice(list_name)
        if notice:
            log.info("%s", notice)
        self.reset()

    # ------------------------------------------------------------------ ground truth

    def _ground_truth(self, records: Sequence[ImageRecord]) -> GroundTruth:
        seen = {self.split.label_names[c]: c for c in self.protocol.seen}
        unknown = self.protocol.unknown
        images, labels, boxes, difficult = [], [], [], []
        line_image = np.empty(len(records), np.int64)  # [L] image index of each line
        for k, r in enumerate(records):
            i = line_image[k] = self._index.setdefault(r.image_id, len(self._index))
            if i < len(images):  # a repeated line: the image's objects are stashed once
                continue
            n = len(r.names)
            images.append(np.full(n, i, np.int64))
            labels.append(np.fromiter((seen.get(name, unknown) for name in r.names), np.int64, n))
            boxes.append(np.asarray(r.boxes, np.float64).reshape(n, 4))
            difficult.append(np.asarray(r.difficult, bool).reshape(n))
        repeats = np.bincount(line_image, minlength=len(self._index))
        if self.protocol_name == "unique-images" or (repeats == 1).all():
            repeats = None

        def cat(parts, shape, dtype):
            return np.concatenate(parts) if parts else np.zeros(shape, dtype)

        return GroundTruth(
            image=cat(images, (0,), np.int64), label=cat(labels, (0,), np.int64),
            boxes=cat(boxes, (0, 4), np.float64), difficult=cat(difficult, (0,), bool),
            num_images=len(self._index), repeats=repeats,
        )

    @property
    def image_ids(self) -> list[str]:
        """The evaluated image ids, each once, in record order."""
        return list(self._index)

    def protocol_notice(self, list_name: str) -> str | None:
        """One line saying how a list that repeats ids is counted (None: no repeats)."""
        n, m = self.num_lines, self.gt.num_images
        if n == m:
            return None
        if self.protocol_name == "listed-lines":
            how = ("repeats are counted as in the published protocol; --unique-images for "
                   "de-duplicated figures")
        else:
            how = "each image is counted once (unique-images); the published figures count " \
                  "every line"
        return f"{list_name}: {n} lines, {m} unique images; {how}"

    def protocol_info(self) -> dict:
        """The result's protocol entries: name, listed lines and unique images."""
        return {"protocol": self.protocol_name, "listed_lines": self.num_lines,
                "unique_images": self.gt.num_images}

    # ------------------------------------------------------------------ the contract

    def reset(self) -> None:
        """Forget every detection processed so far."""
        self._chunks: list[tuple[np.ndarray, ...]] = []
        self._processed: set[int] = set()
        self._repeated = 0

    def _image_index(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise OreError(f"image id {image_id!r} is not in the evaluated split") from None

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Stash the detections of a batch of model outputs.

        Args:
            inputs: one dict per image with ``"image_id"`` (str).
            outputs: one dict per image with ``"boxes"`` (float [N, 4] 0-based xyxy: +1 is
                added to xmin and ymin here, as the reference does), ``"labels"`` (int
                [N], SPEC §2 layout) and ``"scores"`` (float [N]); tensors or arrays.
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            i = self._image_index(inp["image_id"])
            if i in self._processed:  # a repeated image would double its detections
                self._repeated += 1
                continue
            self._processed.add(i)
            boxes = _to_numpy(out["boxes"], np.float64).reshape(-1, 4).copy()
            boxes[:, :2] += 1.0
            labels = _to_numpy(out["labels"], np.int64).reshape(-1)
            scores = _to_numpy(out["scores"], np.float64).reshape(-1)
            if not len(boxes) == len(labels) == len(scores):
                raise ValueError(f"image {inp['image_id']!r}: {len(boxes)} boxes, "
                                 f"{len(labels)} labels, {len(scores)} scores")
            self._chunks.append((np.full(len(labels), i, np.int64), labels, scores, boxes))

    def add_detections(
        self, image_ids: Sequence[str], labels: np.ndarray, scores: np.ndarray,
        boxes: np.ndarray,
    ) -> None:
        """Add detections already in the annotation's pixel coordinates (no shift), e.g.
        from :func:`ore.evaluation.detections.read_detections`.

        Args:
            image_ids: D image ids.
            labels: int [D] label indices (SPEC §2 layout).
            scores: float [D].
            boxes: float [D, 4] ``xmin, ymin, xmax, ymax`` in VOC pixel convention.
        """
        index = self._index
        try:
            images = np.fromiter((index[i] for i in image_ids), np.int64, len(image_ids))
        except KeyError as exc:
            raise OreError(f"detections: image id {exc.args[0]!r} is not in the evaluated "
                           "split") from None
        labels = np.asarray(labels, np.int64).reshape(-1)
        scores = np.asarray(scores, np.float64).reshape(-1)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if not len(images) == len(labels) == len(scores) == len(boxes):
            raise ValueError("image_ids, labels, scores and boxes differ in length")
        self._chunks.append((images, labels, scores, boxes))

    def detections(self) -> Detections:
        """Everything stashed so far, as one :class:`Detections` (unfiltered)."""
        if not self._chunks:
            return Detections.empty()
        return Detections(*(np.concatenate(parts) for parts in zip(*self._chunks)))

    def evaluable_detections(self) -> Detections:
        """The stashed detections that take part: checked, unseen-class ones dropped."""
        dets = self.detections()
        if self._repeated:
            log.warning("%d images were processed more than once; their repeats were "
                        "ignored", self._repeated)
        bad = (dets.label < 1) | (dets.label > self.protocol.unknown)
        if bad.any():
            raise ValueError(f"detection labels must be in 1..{self.protocol.unknown}; got "
                             f"{int(dets.label[bad][0])}")
        if not np.isfinite(dets.score).all() or not np.isfinite(dets.boxes).all():
            raise ValueError("detection scores and boxes must be finite")
        keep = np.isin(dets.label, np.asarray((*self.protocol.seen, self.protocol.unknown)))
        if not keep.all():
            names = sorted({self.split.label_names[c] for c in np.unique(dets.label[~keep])})
            log.warning("%d detections of classes not yet introduced at task %d were "
                        "ignored (%s)", int((~keep).sum()), self.task, ", ".join(names))
            dets = dets.take(np.flatnonzero(keep))
        return dets

    def _warn_copied_detections(self, dets: Detections) -> None:
        """Detections given once per listed line would be counted n × n times: warn when a
        repeated image has exact copies among its detections."""
        if self.gt.repeats is None or not len(dets):
            return
        rows = np.flatnonzero(self.gt.repeats[dets.image] > 1)
        if not len(rows):
            return
        table = np.column_stack([dets.image[rows], dets.label[rows], dets.score[rows],
                                 dets.boxes[rows]])  # [R, 7]
        copies = len(rows) - len(np.unique(table, axis=0))
        if copies:
            log.warning("%d detections of images listed more than once are exact copies of "
                        "another: give each image's detections once; the evaluation repeats "
                        "them per listed line", copies)

    def evaluate(self, *, details: bool = False) -> dict:
        """Compute every figure. Returns a dict with the keys of ``RESULT_KEYS`` (and of
        ``DETAIL_KEYS`` when ``details``); see the class docstring for units."""
        dets = self.evaluable_detections()
        self._warn_copied_detections(dets)
        result = open_world_metrics(self.gt, dets, self.protocol)
        if self.coco:
            result["coco"] = coco_ap(self.gt, dets, self.protocol.seen)
        else:
            result["coco"] = None
        result.update(self.protocol_info())
        keys = RESULT_KEYS + (DETAIL_KEYS if details else ())
        return {k: result[k] for k in keys}

    # ------------------------------------------------------------------ description

    def describe(self) -> str:
        """One line naming what is evaluated, for the table's heading."""
        return (
            f"split {self.split.name}, task {self.task}/{self.split.num_tasks}: "
            f"{len(self.protocol.seen)} known classes + {UNKNOWN}, "
            f"{self.gt.num_images} images ({self.num_lines} listed lines: protocol "
            f"{self.protocol_name}), AP50 {self.ap}"
        )
