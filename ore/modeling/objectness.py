"""A class-agnostic score of whether a box holds one whole object, read from its crop.

Most boxes an open-world detector labels *unknown* are not unknown objects: they cut
through an object (a part of it, or halves of two neighbours) or cover background. What
tells a whole object apart does not depend on its class: its outline lies inside the box,
with background around it on every side. :class:`BoxObjectness` sees each box with a margin
of :data:`CROP_MARGIN` of its width and height around it, resampled to
:data:`CROP_SIZE` pixels square (:func:`crop_boxes`), and returns one logit per box;
:mod:`ore.engine.objectness` learns it from the boxes a run was taught.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.ops import roi_align

from ore.modeling.backbone import build_trunk, trunk_out_channels

CROP_SIZE = 32
CROP_MARGIN = 0.25


def crop_boxes(image: torch.Tensor, boxes: torch.Tensor, size: int = CROP_SIZE,
               margin: float = CROP_MARGIN) -> torch.Tensor:
    """The crops of ``boxes`` [n, 4] (0-based xyxy pixels) in ``image`` [3, H, W], each
    grown by ``margin`` of its width and height on every side, as [n, 3, size, size].
    Bilinear samples, averaged over each output pixel's area (``roi_align`` with adaptive
    sampling); outside the image is 0."""
    boxes = boxes.to(image.dtype).reshape(-1, 4)
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0)
    grown = torch.cat([boxes[:, :2] - margin * wh, boxes[:, 2:] + margin * wh], dim=1)
    return roi_align(image[None], [grown], output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=0, aligned=True)


class BoxObjectness(nn.Module):
    """The tiny trunk, global average pooling and one linear unit: crops [n, 3, S, S] in
    [0, 1] → whole-object logits [n]."""

    def __init__(self, *, arch: str = "tiny"):
        super().__init__()
        self.trunk = build_trunk(arch)
        self.head = nn.Linear(trunk_out_channels(arch), 1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(crops).mean((2, 3)))[:, 0]
