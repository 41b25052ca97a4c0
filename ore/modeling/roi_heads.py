"""Box heads: the closed-set baseline and the ORE head (SPEC §2, §3).

Shapes: B images; P_i proposals of image i; R sampled RoIs over the batch; K known
classes; C = K + 2 classifier outputs (0 background, 1..K classes, K+1 unknown);
D the RoI feature width (the box head's output, which feeds the classifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from ore.modeling.clustering import PrototypeStore, clustering_loss

# Ground-truth boxes appended as proposals rank above every real proposal (sigmoid ≤ 1).
GT_PROPOSAL_SCORE = 2.0
UNK_SOURCES = ("proposals", "sampled")


class StandardRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` unchanged; it accepts and ignores proposal scores."""

    def forward(self, features, proposals, image_shapes, targets=None, proposal_scores=None):
        return super().forward(features, proposals, image_shapes, targets)


def pick_unknowns(
    proposals: torch.Tensor, scores: torch.Tensor, gt_boxes: torch.Tensor, k: int,
    iou_thresh: float = 0.5,
) -> torch.Tensor:
    """Indices of the top-``k`` proposals by objectness whose IoU with every GT box is
    below ``iou_thresh`` (fewer when fewer qualify), highest score first."""
    if k <= 0 or proposals.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=proposals.device)
    if gt_boxes.numel():
        free = box_ops.box_iou(proposals, gt_boxes).max(dim=1).values < iou_thresh  # [P]
    else:
        free = torch.ones(len(proposals), dtype=torch.bool, device=proposals.device)
    n = min(k, int(free.sum()))
    return scores.masked_fill(~free, float("-inf")).topk(n).indices


class ORERoIHeads(RoIHeads):
    """The ORE box head: unknown auto-labelling, contrastive clustering, per-detection
    logits and features at inference.

    Training: the top-``num_unk_per_image`` proposals by RPN objectness that overlap no
    GT box (IoU < ``unk_iou_thresh``) are labelled ``unknown``; they are classified, and
    box-regressed only with ``regress_unknowns``. With ``unk_source="proposals"`` they are
    picked among all post-NMS proposals and join the targets (RoIs overlapping them become
    unknown samples; regressed, they regress toward the picked box); with ``"sampled"``
    (the reference) among the sampled background RoIs (IoU < ``bg_iou_thresh`` to every GT
    box; regressed, toward the GT box they overlap most, as the reference did). The
    reference masked foreground RoIs with objectness logit −1 rather than −∞, so where every
    sampled background RoI scored lower a foreground RoI could become unknown; here one
    never does. Features of foreground RoIs feed the prototype store and the clustering
    loss; with ``background_row`` those of background RoIs fill the store's last row, and
    every foreground feature is pushed from its prototype too.

    Inference: every detection carries its classifier ``logits`` [C] (masked classes at
    −inf) and its RoI ``features`` [D], and boxes are kept down to ``score_thresh`` (which
    may be 0) so that energies can be computed for low-score boxes too; unknown ones down
    to ``unknown_score_thresh`` when given (the unknown class learns from a few
    auto-labelled boxes per image, so its probabilities run lower than the known ones'). With a
    ``relabeller`` (EBUI, ``ore.modeling.energy``) known-class detections may then be
    relabelled ``unknown`` (and NMS run again, or unknown ones dropped, by its rule).
    """

    def __init__(
        self, *, box_roi_pool, box_head, box_predictor, fg_iou_thresh: float,
        bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
        score_thresh: float, nms_thresh: float, detections_per_img: int, unknown_label: int,
        num_unk_per_image: int = 1, unk_source: str = "proposals", unk_iou_thresh: float = 0.5,
        store: PrototypeStore, clustering_enabled: bool = True,
        clustering_margin: float = 10.0, distance_p: float = 2.0, clustering_weight: float = 0.1,
        clustering_reduction: str = "sum", background_row: bool = False,
        regress_unknowns: bool = False, unknown_score_thresh: float | None = None,
    ):
        super().__init__(
            box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
            batch_size_per_image, positive_fraction, None, score_thresh, nms_thresh,
            detections_per_img,
        )
        if unk_source not in UNK_SOURCES:
            raise ValueError(f"unk_source {unk_source!r}: expected one of {UNK_SOURCES}")
        self.unknown_label = unknown_label
        self.num_unk_per_image = num_unk_per_image
        self.unk_source = unk_source
        self.unk_iou_thresh = unk_iou_thresh
        # Test-time score threshold of unknown detections (None: ``score_thresh``).
        self.unknown_score_thresh = unknown_score_thresh
        # The store is always kept (it travels in checkpoints from task to task); with
        # clustering off (the exemplar finetune) it is neither updated nor used.
        self.store = store
        self.clustering_enabled = clustering_enabled
        self.clustering_margin = clustering_margin
        self.distance_p = distance_p
        self.clustering_weight = clustering_weight
        self.clustering_reduction = clustering_reduction
        # The store's last row holds background features (one row more than the classes).
        self.background_row = background_row
        self.regress_unknowns = regress_unknowns
        # Training iterations seen by this head; drives the prototype schedule.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        # EBUI at inference (ore.modeling.energy.EnergyRelabeller), set by build_detector.
        self.relabeller = None

    # --- training -------------------------------------------------------------------------

    @torch.no_grad()
    def set_iteration(self, iteration: int) -> None:
        """Set the counter that drives the prototype schedule (a run that continues one
        counter across tasks starts it at its first iteration)."""
        self.iteration.fill_(iteration)

    def sample_with_scores(self, proposals, scores, targets):
        """``select_training_samples`` that also returns each sampled RoI's objectness."""
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        # GT boxes join the proposals so that early training has positives.
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        scores = [torch.cat([s, s.new_full((len(g),), GT_PROPOSAL_SCORE)])
                  for s, g in zip(scores, gt_boxes)]
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        sampled = self.subsample(labels)
        matched_boxes = []
        for i, keep in enumerate(sampled):
            proposals[i], scores[i] = proposals[i][keep], scores[i][keep]
            labels[i], matched_idxs[i] = labels[i][keep], matched_idxs[i][keep]
            g = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype,
                                                                     device=device)
            matched_boxes.append(g[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_boxes, proposals)
        return proposals, scores, labels, regression_targets

    def add_unknown_targets(self, proposals, scores, targets):
        """Targets with the auto-labelled unknown boxes appended (``proposals`` mode)."""
        out = []
        for p, s, t in zip(proposals, scores, targets):
            idx = pick_unknowns(p, s, t["boxes"], self.num_unk_per_image, self.unk_iou_thresh)
            unk = t["labels"].new_full((len(idx),), self.unknown_label)
            out.append({**t, "boxes": torch.cat([t["boxes"], p[idx].detach()]),
                        "labels": torch.cat([t["labels"], unk])})
        return out

    def relabel_sampled_unknowns(self, scores, labels) -> list[torch.Tensor]:
        """Top-k background RoIs by objectness become unknown (``sampled`` mode); returns
        each image's relabelled indices."""
        picked = []
        for s, lab in zip(scores, labels):
            k = min(self.num_unk_per_image, int((lab == 0).sum()))
            idx = s.masked_fill(lab != 0, float("-inf")).topk(k).indices
            lab[idx] = self.unknown_label
            picked.append(idx)
        return picked

    def regress_sampled_unknowns(self, proposals, picked, targets, regression_targets):
        """Regression targets of the relabelled RoIs: toward the GT box each overlaps most
        (``sampled`` mode with ``regress_unknowns``; an image without GT boxes keeps the
        zero target, and its unknowns are left out of the box loss by the caller)."""
        for p, idx, t, reg in zip(proposals, picked, targets, regression_targets):
            gt = t["boxes"].to(p.dtype)
            if len(idx) and len(gt):
                best = box_ops.box_iou(p[idx], gt).argmax(dim=1)  # [k]
                reg[idx] = self.box_coder.encode_single(gt[best], p[idx])

    def losses(self, class_logits, box_regression, features, labels, regression_targets,
               unregressed=None):
        """``unregressed``: [R] bool, RoIs left out of the box loss whatever their label."""
        labels = torch.cat(labels)  # [R]
        regression_targets = torch.cat(regression_targets)  # [R, 4]
        loss_cls = F.cross_entropy(class_logits, labels)
        # Pseudo-unknowns have no box of their own: by default only known-class positives
        # regress.
        regressed = (labels > 0) if self.regress_unknowns else (
            (labels > 0) & (labels != self.unknown_label))
        if unregressed is not None:
            regressed &= ~unregressed
        pos = torch.where(regressed)[0]
        deltas = box_regression.reshape(len(labels), -1, 4)[pos, labels[pos]]
        loss_box = F.smooth_l1_loss(deltas, regression_targets[pos], beta=1 / 9,
                                    reduction="sum") / max(1, labels.numel())
        out = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.clustering_enabled:
            fg = labels > 0
            rows = labels - 1  # store rows: classes 0..K-1, unknown K, background K+1
            if self.background_row:
                rows = torch.where(fg, rows, torch.full_like(rows, len(self.store.valid) - 1))
            stored = torch.ones_like(fg) if self.background_row else fg
            it = int(self.iteration)
            if self.store.takes_batch_first:
                self.store.enqueue(features[stored].detach(), rows[stored])
            self.store.step(it)
            loss = clustering_loss(features[fg], rows[fg], self.store.prototypes,
                                   self.store.valid, margin=self.clustering_margin,
                                   p=self.distance_p, reduction=self.clustering_reduction)
            active = it >= self.store.start_iter
            out["loss_clustering"] = self.clustering_weight * loss * float(active)
            if not self.store.takes_batch_first:
                self.store.enqueue(features[stored].detach(), rows[stored])
        self.iteration += 1
        return out

    # --- inference ------------------------------------------------------------------------

    def postprocess_with_features(self, class_logits, box_regression, features, proposals,
                                  image_shapes):
        """Per image: boxes, scores, labels, and the logits [D, C] / features [D, dim] of the
        RoI each detection came from."""
        num_classes = class_logits.shape[-1]
        per_image = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals)  # [R, C, 4]
        scores_all = F.softmax(class_logits, -1)  # [R, C]
        results = []
        for boxes, scores, logits, feats, shape in zip(
            boxes_all.split(per_image), scores_all.split(per_image),
            class_logits.split(per_image), features.split(per_image), image_shapes,
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            n = len(boxes)
            roi = torch.arange(n, device=boxes.device)[:, None].expand(n, num_classes)
            label = torch.arange(num_classes, device=boxes.device)[None].expand(n, num_classes)
            boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
            roi, label = roi[:, 1:].reshape(-1), label[:, 1:].reshape(-1)
            thresh = torch.full_like(scores, self.score_thresh)
            if self.unknown_score_thresh is not None:
                thresh[label == self.unknown_label] = self.unknown_score_thresh
            keep = torch.where(scores > thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], label[keep],
                                            self.nms_thresh)][: self.detections_per_img]
            det = {
                "boxes": boxes[keep], "scores": scores[keep], "labels": label[keep],
                "logits": logits[roi[keep]], "features": feats[roi[keep]],
            }
            if self.relabeller is not None:
                det = self.relabeller(det, self.nms_thresh)
            results.append(det)
        return results

    # --- both -----------------------------------------------------------------------------

    def forward(self, features, proposals, image_shapes, targets=None, proposal_scores=None):
        if proposal_scores is None:
            raise ValueError("the ORE head needs the RPN's proposal scores (use ScoredRPN)")
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training")
            if self.unk_source == "proposals":
                targets = self.add_unknown_targets(proposals, proposal_scores, targets)
            proposals, scores, labels, reg_targets = self.sample_with_scores(
                proposals, proposal_scores, targets
            )
            unregressed = None
            if self.unk_source == "sampled":
                picked = self.relabel_sampled_unknowns(scores, labels)
                if self.regress_unknowns:
                    self.regress_sampled_unknowns(proposals, picked, targets, reg_targets)
                    # No GT box to regress toward: the image's unknowns stay unregressed.
                    unregressed = torch.cat([
                        (lab == self.unknown_label) & (len(t["boxes"]) == 0)
                        for lab, t in zip(labels, targets)])
        roi_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(roi_features)
        if self.training:
            return [], self.losses(class_logits, box_regression, roi_features, labels,
                                   reg_targets, unregressed)
        return self.postprocess_with_features(class_logits, box_regression, roi_features,
                                              proposals, image_shapes), {}
