"""A region proposal network that also returns each proposal's objectness.

torchvision's ``RegionProposalNetwork.forward`` keeps the objectness scores of the
proposals it returns to itself; the ORE head needs them to pick unknown objects.
"""

from __future__ import annotations

import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers


class ScoredRPN(RegionProposalNetwork):
    """``forward`` returns ``(proposals, objectness, losses)``.

    ``proposals[i]`` is [P_i, 4] and ``objectness[i]`` [P_i], the sigmoid probability of
    each proposal after NMS, in the same order.
    """

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
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, deltas, labels, regression_targets
            )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, scores, losses
