"""Triplet loss (Weinberger & Saul, 2009; Schroff et al., FaceNet, 2015)."""

from __future__ import annotations

import torch
from torch import nn

from ore.contrastive._checks import check_margin


class TripletLoss(nn.Module):
    """The anchor must be closer to the positive than to the negative by a margin:

        L = (1/N) Σ_i max(0, ‖a_i − p_i‖² − ‖a_i − n_i‖² + ε)

    Attributes:
        margin: ε (≥ 0), in squared-distance units.

    Examples:
        >>> a, p, n = torch.randn(3, 8, 16).unbind(0)
        >>> loss = TripletLoss(margin=0.5)(a, p, n)
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = check_margin(margin)

    def forward(
        self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> torch.Tensor:
        """anchor, positive, negative: [N, D]. Returns a scalar."""
        if not anchor.shape == positive.shape == negative.shape:
            raise ValueError(
                f"anchor, positive, negative must share a shape, got "
                f"{anchor.shape}, {positive.shape}, {negative.shape}"
            )
        d_ap = (anchor - positive).pow(2).sum(dim=-1)
        d_an = (anchor - negative).pow(2).sum(dim=-1)
        return torch.relu(d_ap - d_an + self.margin).mean()
