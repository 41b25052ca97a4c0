"""Max-margin contrastive loss on pairs (Hadsell, Chopra & LeCun, 2006)."""

from __future__ import annotations

import torch
from torch import nn

from ore.contrastive._checks import check_margin


class MaxMarginContrastiveLoss(nn.Module):
    """Pull similar pairs together, push dissimilar pairs beyond a margin.

    With d_i = ‖x_i − x'_i‖² and s_i ∈ {0, 1} the "same" flag:

        L = (1/N) Σ_i [ s_i · d_i + (1 − s_i) · max(0, ε − d_i) ]

    Attributes:
        margin: ε, in squared-distance units (≥ 0).

    Examples:
        >>> loss_fn = MaxMarginContrastiveLoss(margin=1.0)
        >>> x_i, x_j = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = loss_fn(x_i, x_j, torch.rand(8) > 0.5)
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = check_margin(margin)

    def forward(self, x_i: torch.Tensor, x_j: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """x_i, x_j: [N, D]; same: bool [N]. Returns a scalar."""
        if x_i.shape != x_j.shape or x_i.ndim != 2:
            raise ValueError(f"x_i and x_j must both be [N, D], got {x_i.shape}, {x_j.shape}")
        d2 = (x_i - x_j).pow(2).sum(dim=1)  # [N]
        same = same.to(d2.dtype)
        return (same * d2 + (1 - same) * torch.relu(self.margin - d2)).mean()
