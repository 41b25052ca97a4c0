"""Dense (cell-level) contrastive learning between two augmented views of each image.

Shapes: n images, two views each, feature maps [n, d, h, w] (h·w = c cells per view);
M = 2·n·c cells in the batch. A view's *box* [n, 4] holds the image coordinates (fractions
of the width and height) of its left, top, right and bottom edges, as
:class:`~ore.contrastive.augment.BatchAugment` returns them (left > right for a flipped
view).

Because both crops are known, the positive of a cell needs no feature matching (DenseCL
matches by feature similarity, PixPro by distance): it is the cell of the other view that
covers the same image location.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_temperature, fp32_loss


def cell_centres(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Image coordinates [n, h·w, 2] (x, y) of the centres of a view's h×w cells, row-major.

    Cell (i, j) of a view spans the fractions [j/w, (j+1)/w] × [i/h, (i+1)/h] of the view.
    """
    u = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) / w  # [w]
    v = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) / h  # [h]
    x = boxes[:, 0:1] + u[None] * (boxes[:, 2:3] - boxes[:, 0:1])  # [n, w]
    y = boxes[:, 1:2] + v[None] * (boxes[:, 3:4] - boxes[:, 1:2])  # [n, h]
    return torch.stack(
        [x[:, None, :].expand(-1, h, -1), y[:, :, None].expand(-1, -1, w)], dim=-1
    ).reshape(boxes.shape[0], h * w, 2)


def match_cells(boxes_a: torch.Tensor, boxes_b: torch.Tensor, h: int, w: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every cell of view a, the cell of view b (same grid h×w) containing its centre.

    Args:
        boxes_a, boxes_b: [n, 4] the two views' boxes (left, top, right, bottom).
    Returns:
        index [n, h·w] (int64, row-major cell of view b; 0 where there is none) and
        valid [n, h·w] (bool: the centre falls inside view b).
    """
    centres = cell_centres(boxes_a, h, w)  # [n, c, 2]
    left, top = boxes_b[:, None, 0], boxes_b[:, None, 1]
    u = (centres[..., 0] - left) / (boxes_b[:, None, 2] - left)  # fraction of view b's width
    v = (centres[..., 1] - top) / (boxes_b[:, None, 3] - top)
    valid = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    col = (u * w).floor().clamp(0, w - 1).long()
    row = (v * h).floor().clamp(0, h - 1).long()
    return torch.where(valid, row * w + col, torch.zeros_like(col)), valid


class DenseInfoNCELoss(nn.Module):
    """InfoNCE between the cells of two views that cover the same image location.

    Every cell a of view 1 whose centre lies inside view 2 is an anchor, with positive
    p(a) the view-2 cell containing that centre; view 2's cells are anchors the same way
    towards view 1. The keys are all M cells of both views of the whole batch:

        ℓ(a) = −log( exp(sim(z_a, z_p(a))/τ) / Σ_{k ≠ a} exp(sim(z_a, z_k)/τ) )
        L = (1/|A|) Σ_{a ∈ A} ℓ(a)

    with sim the cosine similarity over the channel dimension and A the anchors of both
    directions. So the negatives of a cell are the other cells of its own view and of
    the other view (other locations of the same image) and every cell of the other
    images. Equal similarities give L = log(M − 1). With no overlapping cell in the batch
    the loss is 0 (with a graph, so that a step can still run).

    The logits are [|A|, M] (|A| ≤ M = 2·n·h·w): pool the maps to a coarse grid first
    (DenseCL uses 7×7).

    Attributes:
        temperature: τ.

    Examples:
        >>> z1, z2 = torch.randn(4, 16, 7, 7), torch.randn(4, 16, 7, 7)
        >>> boxes1 = torch.tensor([[0.0, 0.0, 0.8, 0.8]]).repeat(4, 1)
        >>> boxes2 = torch.tensor([[1.0, 0.2, 0.2, 1.0]]).repeat(4, 1)  # flipped
        >>> loss = DenseInfoNCELoss(0.2)(z1, z2, boxes1, boxes2)
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = check_temperature(temperature)

    @fp32_loss
    def forward(self, z1: torch.Tensor, z2: torch.Tensor, boxes1: torch.Tensor,
                boxes2: torch.Tensor) -> torch.Tensor:
        """z1, z2: [n, d, h, w] the two views' maps; boxes1, boxes2: [n, 4]. A scalar."""
        if z1.shape != z2.shape or z1.ndim != 4:
            raise ValueError(f"z1 and z2 must both be [n, d, h, w], got {tuple(z1.shape)}, "
                             f"{tuple(z2.shape)}")
        n, d, h, w = z1.shape
        if boxes1.shape != (n, 4) or boxes2.shape != (n, 4):
            raise ValueError(f"boxes must be [{n}, 4], got {tuple(boxes1.shape)}, "
                             f"{tuple(boxes2.shape)}")
        c = h * w
        keys = torch.cat([z1, z2]).flatten(2).transpose(1, 2).reshape(2 * n * c, d)  # [M, d]
        keys = F.normalize(keys, dim=1)
        boxes1, boxes2 = boxes1.to(keys.dtype), boxes2.to(keys.dtype)
        idx12, ok12 = match_cells(boxes1, boxes2, h, w)  # view 1 → view 2, [n, c]
        idx21, ok21 = match_cells(boxes2, boxes1, h, w)
        base = torch.arange(n, device=keys.device)[:, None] * c  # first cell of each image
        # Key rows: view 1's cells are 0 … n·c − 1, view 2's n·c … 2·n·c − 1.
        self_idx = torch.cat([base + torch.arange(c, device=keys.device),
                              n * c + base + torch.arange(c, device=keys.device)])  # [2n, c]
        pos_idx = torch.cat([n * c + base + idx12, base + idx21])  # [2n, c]
        valid = torch.cat([ok12, ok21]).flatten()
        if not bool(valid.any()):
            return keys.sum() * 0.0
        rows = self_idx.flatten()[valid]  # [A]
        pos = pos_idx.flatten()[valid]
        anchors = keys[rows] * (1.0 / self.temperature)  # [A, d]
        logits = anchors @ keys.T  # [A, M]
        # The self-pair gets −inf: no mass in the sum, no gradient. In place is safe: the
        # matmul's backward needs its inputs, not its output.
        logits[torch.arange(rows.numel(), device=keys.device), rows] = float("-inf")
        return F.cross_entropy(logits, pos)  # fused, max-shifted log-softmax
