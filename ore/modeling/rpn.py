"""A region proposal network that also returns each proposal's objectness.

torchvision's ``RegionProposalNetwork.forward`` keeps the objectness scores of the
proposals it returns to itself; the ORE head needs them to pick unknown objects.

Objectness is learnt one of two ways (``MODEL.RPN.OBJECTNESS``):

- ``classification`` (Faster R-CNN, the paper's): binary cross-entropy, anchors with
  IoU ≥ 0.7 to a GT box positive, < 0.3 negative. Objects nobody annotated yet are
  negatives, so the RPN learns to suppress exactly the unknowns the open world asks for.
- ``quality`` (localisation quality, as in OLN, Kim et al. 2022): the sigmoid of the
  logit regresses the anchor's IoU with its best GT box, ``L = mean |σ(o_a) − IoU_a|``
  over anchors with IoU_a ≥ ``quality_iou`` only. No anchor is ever a negative, so an
  unannotated object is never trained down; the score ranks how well an anchor frames
  *some* object. Box regression is trained as in Faster R-CNN.

With the ORE head, the proposals it auto-labels ``unknown`` (the top-k by objectness
overlapping no GT box, :func:`ore.modeling.roi_heads.pick_unknowns`) can also change
what the RPN learns (``OWOD.RPN_UNKNOWNS``): ``negative`` (the paper: the RPN never
hears of them, anchors on them stay negatives), ``ignore`` (negative anchors with
IoU ≥ the RPN's background threshold to one of them are left out of the loss) or
``positive`` (they join the RPN's targets as objects).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import box_iou

from ore.modeling.roi_heads import pick_unknowns

OBJECTNESS_MODES = ("classification", "quality")
RPN_UNKNOWN_MODES = ("negative", "ignore", "positive")


class ScoredRPN(RegionProposalNetwork):
    """``forward`` returns ``(proposals, objectness, losses)``.

    ``proposals[i]`` is [P_i, 4] and ``objectness[i]`` [P_i], the sigmoid probability of
    each proposal after NMS, in the same order.

    Args (beyond torchvision's): ``objectness`` one of :data:`OBJECTNESS_MODES`;
    ``quality_iou`` the lowest anchor IoU trained in ``quality`` mode; ``unknowns`` one of
    :data:`RPN_UNKNOWN_MODES`, with ``num_unknowns`` picks per image overlapping every GT
    box by less than ``unknown_iou``.
    """

    def __init__(self, *args, objectness: str = "classification", quality_iou: float = 0.3,
                 unknowns: str = "negative", num_unknowns: int = 1, unknown_iou: float = 0.5,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if objectness not in OBJECTNESS_MODES:
            raise ValueError(f"objectness {objectness!r}: expected one of {OBJECTNESS_MODES}")
        if unknowns not in RPN_UNKNOWN_MODES:
            raise ValueError(f"unknowns {unknowns!r}: expected one of {RPN_UNKNOWN_MODES}")
        self.objectness_mode = objectness
        self.quality_iou = quality_iou
        self.unknowns = unknowns
        self.num_unknowns = num_unknowns
        self.unknown_iou = unknown_iou

    def unknown_boxes(self, boxes: list[torch.Tensor], scores: list[torch.Tensor],
                      targets: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Per image, the proposals the ORE head will auto-label ``unknown`` [k_i, 4]."""
        return [b[pick_unknowns(b, s, t["boxes"], self.num_unknowns, self.unknown_iou)].detach()
                for b, s, t in zip(boxes, scores, targets)]

    def ignore_near(self, labels: list[torch.Tensor], anchors: list[torch.Tensor],
                    unknown: list[torch.Tensor]) -> list[torch.Tensor]:
        """``labels`` with negative anchors near an unknown box set to −1 (ignored)."""
        out = []
        for lab, a, u in zip(labels, anchors, unknown):
            if len(u):
                near = (box_iou(u.to(a.dtype), a).max(dim=0).values
                        >= self.proposal_matcher.low_threshold)
                lab = torch.where(near & (lab == 0), torch.full_like(lab, -1.0), lab)
            out.append(lab)
        return out

    def quality_loss(self, objectness: torch.Tensor, anchors: list[torch.Tensor],
                     targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``mean |σ(o) − IoU|`` over up to ``batch_size_per_image`` anchors per image with
        IoU ≥ ``quality_iou`` (drawn at random when more qualify). ``objectness`` is the
        flat [ΣA] logit vector, in the order of ``anchors``."""
        chosen, wanted = [], []
        offset = 0
        for a, t in zip(anchors, targets):
            if t["boxes"].numel():
                best = box_iou(t["boxes"].to(a.dtype), a).max(dim=0).values  # [A]
                idx = torch.where(best >= self.quality_iou)[0]
                if len(idx) > self.fg_bg_sampler.batch_size_per_image:
                    pick = torch.randperm(len(idx), device=idx.device)
                    idx = idx[pick[: self.fg_bg_sampler.batch_size_per_image]]
                chosen.append(idx + offset)
                wanted.append(best[idx])
            offset += len(a)
        if not chosen:
            return objectness.sum() * 0.0
        idx = torch.cat(chosen)
        return F.l1_loss(objectness[idx].sigmoid(), torch.cat(wanted).to(objectness.dtype))

    def forward(
        self, images: ImageList, features: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        levels = list(features.values())
        objectness, deltas = self.head(levels)
        anchors = self.anchor_generator(images, levels)
        num_anchors_per_level = [o[0].numel() for o in objectness]  # A·H·W per level
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        # Proposals are not trained through: the box head sees them as fixed inputs.
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = self.filter_proposals(
            proposals, objectness, images.image_sizes, num_anchors_per_level
        )
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training")
            unknown = (self.unknown_boxes(boxes, scores, targets)
                       if self.unknowns != "negative" else None)
            if self.unknowns == "positive":
                targets = [{**t, "boxes": torch.cat([t["boxes"], u.to(t["boxes"].dtype)])}
                           for t, u in zip(targets, unknown)]
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            if self.unknowns == "ignore":
                labels = self.ignore_near(labels, anchors, unknown)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, deltas, labels, regression_targets
            )
            if self.objectness_mode == "quality":
                loss_objectness = self.quality_loss(objectness.flatten(), anchors, targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, scores, losses
