"""Faster R-CNN assembled from torchvision parts, configured by ``ore.config``.

Shapes: B images, R RoIs, K classes over all tasks. The classifier has K + 2 outputs
and never grows within a class split (SPEC §2): 0 = background, 1..K = classes in task
order, K+1 = unknown. A split extended by a task after training (``ore add-task``) is met
by :func:`extend_class_layout`.
Classes not yet introduced are masked: their logits are −inf in training and at test
time, so they get no gradient and never win. The standard (closed-set) head keeps
``unknown`` masked as well; the ORE head activates it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from ore.data.classes import TaskSplit
from ore.errors import OreError
from ore.modeling.backbone import build_fpn_backbone
from ore.modeling.clustering import (
    PROTOTYPE_INITS,
    REDUCTIONS,
    UPDATE_PHASES,
    PrototypeStore,
)
from ore.modeling.energy import build_relabeller
from ore.modeling.roi_heads import UNK_SOURCES, ORERoIHeads, StandardRoIHeads
from ore.modeling.rpn import OBJECTNESS_MODES, RPN_UNKNOWN_MODES, ScoredRPN

log = logging.getLogger(__name__)

BACKBONES = {"resnet50_fpn": "resnet50", "resnet18_fpn": "resnet18", "tiny_fpn": "tiny"}
ROI_HEADS = ("standard", "ore")


class MaskedBoxPredictor(nn.Module):
    """Class logits and class-specific box deltas, with inactive classes masked.

    Args:
        in_channels: width of the RoI feature.
        num_outputs: K + 2 (background, K classes, unknown).
    """

    def __init__(self, in_channels: int, num_outputs: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_outputs)
        self.bbox_pred = nn.Linear(in_channels, num_outputs * 4)
        # True where the class may be predicted; background always may.
        self.register_buffer("active", torch.ones(num_outputs, dtype=torch.bool))

    @torch.no_grad()
    def set_active_classes(self, labels: Iterable[int]) -> None:
        self.active.zero_()
        self.active[0] = True
        self.active[list(labels)] = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        logits = self.cls_score(x).masked_fill(~self.active, float("-inf"))  # [R, K+2]
        return logits, self.bbox_pred(x)  # [R, K+2], [R, 4(K+2)]


class DetectionTransform(GeneralizedRCNNTransform):
    """Normalises and batches; resizes only at inference (the data layer resizes in training)."""

    def resize(self, image, target=None):
        if self.training:
            return image, target
        return super().resize(image, target)


def active_labels(split: TaskSplit, task: int, with_unknown: bool) -> list[int]:
    """Labels the classifier may predict at ``task``: every seen class (+ unknown)."""
    labels = [split.label(c) for c in split.seen(task)]
    return labels + [split.unknown_label] if with_unknown else labels


class OpenWorldRCNN(GeneralizedRCNN):
    """Backbone → scored RPN → RoI heads, with proposal objectness passed to the heads.

    Training returns a dict of ``loss_*`` tensors; inference a list of per-image dicts
    (``boxes`` in the input image's pixels, ``labels``, ``scores``; the ORE head adds
    ``logits`` and ``features``).
    """

    def forward(self, images, targets=None):
        if self.training and targets is None:
            raise ValueError("targets are required in training")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        proposals, scores, rpn_losses = self.rpn(image_list, features, targets)
        detections, head_losses = self.roi_heads(
            features, proposals, image_list.image_sizes, targets, scores
        )
        if self.training:
            return {**head_losses, **rpn_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def build_detector(cfg: DictConfig, split: TaskSplit, *, backbone_weights: Any = None
                   ) -> OpenWorldRCNN:
    """A Faster R-CNN for ``split`` from ``cfg``.

    ``backbone_weights`` are the contents of ``MODEL.BACKBONE.WEIGHTS``, read by the caller
    (:func:`ore.engine.checkpoint.build_model` reads the files and loads any checkpoint).
    """
    m = cfg.MODEL
    if m.BACKBONE.WEIGHTS and backbone_weights is None:
        raise ValueError("MODEL.BACKBONE.WEIGHTS is set: pass the weights read from it as "
                         "backbone_weights")
    if m.BACKBONE.NAME not in BACKBONES:
        raise OreError(
            f"MODEL.BACKBONE.NAME: unknown backbone {m.BACKBONE.NAME!r}; "
            f"expected one of {sorted(BACKBONES)}"
        )
    if m.ROI_HEADS.NAME not in ROI_HEADS:
        raise OreError(f"MODEL.ROI_HEADS.NAME: {m.ROI_HEADS.NAME!r}; expected one of {ROI_HEADS}")
    if m.RPN.OBJECTNESS not in OBJECTNESS_MODES:
        raise OreError(f"MODEL.RPN.OBJECTNESS: {m.RPN.OBJECTNESS!r}; expected one of "
                       f"{OBJECTNESS_MODES}")
    if cfg.OWOD.RPN_UNKNOWNS not in RPN_UNKNOWN_MODES:
        raise OreError(f"OWOD.RPN_UNKNOWNS: {cfg.OWOD.RPN_UNKNOWNS!r}; expected one of "
                       f"{RPN_UNKNOWN_MODES}")
    if cfg.OWOD.UNK_SOURCE not in UNK_SOURCES:
        raise OreError(f"OWOD.UNK_SOURCE: {cfg.OWOD.UNK_SOURCE!r}; expected one of {UNK_SOURCES}")
    for key, value, choices in (
        ("CLUSTERING.LOSS_REDUCTION", cfg.CLUSTERING.LOSS_REDUCTION, REDUCTIONS),
        ("CLUSTERING.PROTOTYPE_INIT", cfg.CLUSTERING.PROTOTYPE_INIT, PROTOTYPE_INITS),
        ("CLUSTERING.UPDATE_PHASE", cfg.CLUSTERING.UPDATE_PHASE, UPDATE_PHASES),
    ):
        if value not in choices:
            raise OreError(f"{key}: {value!r}; expected one of {choices}")
    stages = tuple(m.BACKBONE.RETURNED_STAGES)
    backbone = build_fpn_backbone(
        arch=BACKBONES[m.BACKBONE.NAME], norm=m.BACKBONE.NORM, weights=backbone_weights,
        weights_source=m.BACKBONE.WEIGHTS,
        trainable_layers=m.BACKBONE.TRAINABLE_LAYERS, returned_stages=stages,
        out_channels=m.BACKBONE.FPN_CHANNELS,
        pixel_mean=tuple(cfg.INPUT.PIXEL_MEAN), pixel_std=tuple(cfg.INPUT.PIXEL_STD),
    )
    levels = len(stages) + 1  # plus the max-pooled top level
    if len(m.ANCHOR.SIZES) != levels:
        raise OreError(
            f"MODEL.ANCHOR.SIZES has {len(m.ANCHOR.SIZES)} levels; the backbone gives {levels} "
            f"(one per MODEL.BACKBONE.RETURNED_STAGES entry plus the pooled level)"
        )
    anchors = AnchorGenerator(
        sizes=tuple(tuple(s) for s in m.ANCHOR.SIZES),
        aspect_ratios=(tuple(m.ANCHOR.ASPECT_RATIOS),) * levels,
    )
    rpn_cfg = m.RPN
    rpn = ScoredRPN(
        anchors, RPNHead(m.BACKBONE.FPN_CHANNELS, anchors.num_anchors_per_location()[0]),
        rpn_cfg.FG_IOU_THRESH, rpn_cfg.BG_IOU_THRESH, rpn_cfg.BATCH_SIZE_PER_IMAGE,
        rpn_cfg.POSITIVE_FRACTION,
        dict(training=rpn_cfg.PRE_NMS_TOP_N_TRAIN, testing=rpn_cfg.PRE_NMS_TOP_N_TEST),
        dict(training=rpn_cfg.POST_NMS_TOP_N_TRAIN, testing=rpn_cfg.POST_NMS_TOP_N_TEST),
        rpn_cfg.NMS_THRESH, objectness=rpn_cfg.OBJECTNESS, quality_iou=rpn_cfg.QUALITY_IOU,
        unknowns=cfg.OWOD.RPN_UNKNOWNS if m.ROI_HEADS.NAME == "ore" else "negative",
        num_unknowns=cfg.OWOD.RPN_NUM_UNK or cfg.OWOD.NUM_UNK_PER_IMAGE,
        unknown_iou=cfg.OWOD.UNK_IOU_THRESH,
    )
    res = m.ROI_BOX_HEAD.POOLER_RESOLUTION
    roi = m.ROI_HEADS
    common = dict(
        box_roi_pool=MultiScaleRoIAlign(
            featmap_names=[str(i) for i in range(len(stages))], output_size=res,
            sampling_ratio=m.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        ),
        box_head=TwoMLPHead(m.BACKBONE.FPN_CHANNELS * res * res, m.ROI_BOX_HEAD.FC_DIM),
        box_predictor=MaskedBoxPredictor(m.ROI_BOX_HEAD.FC_DIM, split.num_classes + 2),
        fg_iou_thresh=roi.FG_IOU_THRESH, bg_iou_thresh=roi.BG_IOU_THRESH,
        batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE, positive_fraction=roi.POSITIVE_FRACTION,
        score_thresh=roi.SCORE_THRESH_TEST, nms_thresh=roi.NMS_THRESH_TEST,
        detections_per_img=roi.DETECTIONS_PER_IMAGE,
    )
    if roi.NAME == "ore":
        c, o = cfg.CLUSTERING, cfg.OWOD
        # Rows: the classes, unknown, and background with CLUSTERING.BACKGROUND_ROW.
        store = PrototypeStore(
            split.num_classes + 1 + int(c.BACKGROUND_ROW), m.ROI_BOX_HEAD.FC_DIM,
            items_per_class=c.ITEMS_PER_CLASS, momentum=c.MOMENTUM, start_iter=c.START_ITER,
            update_every=c.UPDATE_MU_ITER, init=c.PROTOTYPE_INIT, phase=c.UPDATE_PHASE,
        )
        heads = ORERoIHeads(
            **common, unknown_label=split.unknown_label, num_unk_per_image=o.NUM_UNK_PER_IMAGE,
            unk_source=o.UNK_SOURCE, unk_iou_thresh=o.UNK_IOU_THRESH,
            store=store, clustering_enabled=c.ENABLED, clustering_margin=c.MARGIN,
            distance_p=c.DISTANCE_P, clustering_weight=c.LOSS_WEIGHT,
            clustering_reduction=c.LOSS_REDUCTION, background_row=c.BACKGROUND_ROW,
            regress_unknowns=o.REGRESS_UNKNOWNS,
            unknown_score_thresh=(roi.UNKNOWN_SCORE_THRESH_TEST
                                  if roi.UNKNOWN_SCORE_THRESH_TEST >= 0 else None),
        )
    else:
        heads = StandardRoIHeads(
            common["box_roi_pool"], common["box_head"], common["box_predictor"],
            roi.FG_IOU_THRESH, roi.BG_IOU_THRESH, roi.BATCH_SIZE_PER_IMAGE,
            roi.POSITIVE_FRACTION, None, roi.SCORE_THRESH_TEST, roi.NMS_THRESH_TEST,
            roi.DETECTIONS_PER_IMAGE,
        )
    inp = cfg.INPUT
    transform = DetectionTransform(
        min_size=inp.MIN_SIZE_TEST, max_size=inp.MAX_SIZE_TEST,
        image_mean=list(inp.PIXEL_MEAN), image_std=list(inp.PIXEL_STD),
    )
    model = OpenWorldRCNN(backbone, rpn, heads, transform)
    task = split.check_task(cfg.OWOD.TASK)
    heads.box_predictor.set_active_classes(active_labels(split, task, roi.NAME == "ore"))
    if cfg.EBUI.ENABLED:
        if roi.NAME != "ore":
            raise OreError("EBUI.ENABLED needs MODEL.ROI_HEADS.NAME=ore (the standard head "
                           "has no unknown class)")
        heads.relabeller = build_relabeller(cfg.EBUI, split, task)
    return model


def checkpoint_meta(cfg: DictConfig, split: TaskSplit) -> dict:
    """What a checkpoint must agree on to be loaded: the class layout and the head."""
    return {
        "classes": list(split.classes),
        "roi_head": cfg.MODEL.ROI_HEADS.NAME,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "task": int(cfg.OWOD.TASK),
    }


def _is_prefix(old: Iterable[str], new: Iterable[str]) -> bool:
    old, new = list(old), list(new)
    return len(old) < len(new) and new[: len(old)] == old


# State entries indexed by label (background, classes, unknown), by 4 × label (the
# class-specific box deltas), and by prototype-store row (classes, unknown, background).
_BY_LABEL = ("roi_heads.box_predictor.cls_score.",)
_BY_BOX_LABEL = ("roi_heads.box_predictor.bbox_pred.",)
_BY_STORE_ROW = ("roi_heads.store.",)


def extend_class_layout(state: dict[str, torch.Tensor], old_k: int, new_k: int,
                        fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` of a detector with ``old_k`` classes as a detector with ``new_k`` ≥
    ``old_k`` classes whose first ``old_k`` are the same: background and the old classes
    keep their label, ``unknown`` moves from ``old_k + 1`` to ``new_k + 1``, and the rows of
    the added classes are taken from ``fresh`` (the new model's own initialisation). The
    same for the prototype store's rows (classes ``0..K−1``, unknown ``K``, background
    ``K + 1`` when the store keeps one)."""
    labels = torch.cat([torch.arange(old_k + 1), torch.tensor([new_k + 1])])  # old → new
    out = dict(state)
    for key, value in state.items():
        if key not in fresh or fresh[key].shape == value.shape:
            continue
        if key.startswith(_BY_LABEL):
            dst = labels
        elif key.startswith(_BY_BOX_LABEL):
            dst = (4 * labels[:, None] + torch.arange(4)).reshape(-1)
        elif key.startswith(_BY_STORE_ROW):
            rows = value.shape[0]
            background = rows == old_k + 2
            dst = torch.cat([torch.arange(old_k), torch.tensor([new_k]),
                             torch.tensor([new_k + 1] if background else [], dtype=torch.long)])
        else:
            continue  # left to the shape check of the caller
        if len(dst) != value.shape[0] or int(dst.max()) >= fresh[key].shape[0]:
            continue
        extended = fresh[key].clone()
        extended[dst] = value
        out[key] = extended
    return out


def load_detector_state(model: nn.Module, ckpt: Any, split: TaskSplit, source: str) -> dict:
    """Load a detector checkpoint (``{"model": state_dict, "meta": …}``, read from the file
    ``source``) into ``model``.

    The class layout must match, or be a prefix of ``split``'s (a task appended to the split
    since: :func:`extend_class_layout`); the active-class mask is set by the config, not the
    file.
    Returns the checkpoint's meta.
    """
    path = source
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise OreError(f"{path}: not an ORE detector checkpoint (no 'model' state dict)")
    meta = ckpt.get("meta") or {}
    state = dict(ckpt["model"])
    old_classes = meta.get("classes")
    if old_classes is not None and _is_prefix(old_classes, split.classes):
        # A task added to the split after this checkpoint was trained: its classes come
        # first, the added ones start from this model's initialisation.
        state = extend_class_layout(state, len(old_classes), split.num_classes,
                                    model.state_dict())
        log.info("%s: %d classes extended to %d (new: %s)", path, len(old_classes),
                 split.num_classes, ", ".join(split.classes[len(old_classes):]))
    elif old_classes is not None and list(old_classes) != list(split.classes):
        raise OreError(
            f"{path}: checkpoint was trained for a different class layout "
            f"({len(meta['classes'])} classes, first {meta['classes'][:3]}) than "
            f"split {split.name} ({split.num_classes} classes, first {list(split.classes[:3])})"
        )
    active_key = "roi_heads.box_predictor.active"
    state.pop(active_key, None)
    own = model.state_dict()
    missing = [k for k in own if k not in state and k != active_key]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise OreError(
            f"{path}: does not fit this model ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}; "
            f"{len(mismatched)} of another shape, e.g. {mismatched[:2]})"
        )
    model.load_state_dict(state, strict=False)
    return meta
