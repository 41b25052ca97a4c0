"""Running a trained detector: load config + weights, predict on images or a split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from ore.data.classes import TaskSplit, load_task_split
from ore.data.dataset import image_to_tensor
from ore.engine.checkpoint import build_model
from ore.engine.runtime import resolve_device
from ore.modeling.energy import energy


@dataclass
class ImageDetections:
    """A predictor's detections of one image in its pixel coordinates (0-based xyxy)."""

    boxes: np.ndarray  # float32 [D, 4]
    labels: np.ndarray  # int64 [D], SPEC §2 layout
    scores: np.ndarray  # float32 [D]
    names: list[str]
    # With EBUI on (ORE head and an energy fit): per detection the energy E of its seen-class
    # logits and the log densities of -E under the known and the unknown fit. None otherwise.
    energies: np.ndarray | None = None  # float32 [D]
    known_logpdf: np.ndarray | None = None  # float32 [D]
    unknown_logpdf: np.ndarray | None = None  # float32 [D]
    # With ``features=True`` (ORE head): each detection's RoI feature. None otherwise.
    features: np.ndarray | None = None  # float32 [D, F]


class Predictor:
    """A detector in eval mode on a device, with its class split.

    Args:
        cfg: the config (class split, task, model and test-time input sizes).
        weights: a detector checkpoint written by ``ore train``.
        score_thresh: overrides ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` (and
            ``UNKNOWN_SCORE_THRESH_TEST``) when given.
    """

    def __init__(self, cfg: DictConfig, weights: str, score_thresh: float | None = None):
        self.cfg = cfg
        self.split: TaskSplit = load_task_split(cfg.DATASETS.CLASSES)
        self.device = resolve_device(cfg.DEVICE)
        self.model = build_model(cfg, self.split, weights)
        if score_thresh is not None:
            # One threshold given by the user holds for every class, unknown included.
            self.model.roi_heads.score_thresh = float(score_thresh)
            if hasattr(self.model.roi_heads, "unknown_score_thresh"):
                self.model.roi_heads.unknown_score_thresh = float(score_thresh)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def predict_tensors(self, images: list[torch.Tensor], features: bool = False
                        ) -> list[ImageDetections]:
        """Detections of each image; with ``features`` also each one's RoI feature (the
        ORE head returns them)."""
        outputs = self.model([im.to(self.device) for im in images])
        names = self.split.label_names
        relabeller = getattr(self.model.roi_heads, "relabeller", None)
        result = []
        for o in outputs:
            labels = o["labels"].cpu().numpy().astype(np.int64)
            det = ImageDetections(
                boxes=o["boxes"].float().cpu().numpy(), labels=labels,
                scores=o["scores"].float().cpu().numpy(), names=[names[i] for i in labels],
            )
            if relabeller is not None and "logits" in o:
                e = energy(o["logits"].float().cpu(), relabeller.seen_labels,
                           relabeller.temperature)  # [D], at the T the rule scored
                det.energies = e.numpy()
                det.known_logpdf = np.asarray(relabeller.fit.known.logpdf(-e), np.float32)
                det.unknown_logpdf = np.asarray(relabeller.fit.unknown.logpdf(-e), np.float32)
            if features and "features" in o:
                det.features = o["features"].float().cpu().numpy()
            result.append(det)
        return result

    def predict(self, images_rgb: list[np.ndarray], features: bool = False
                ) -> list[ImageDetections]:
        return self.predict_tensors([image_to_tensor(im) for im in images_rgb], features)
