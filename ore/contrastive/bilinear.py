"""Bilinear InfoNCE of CURL (Srinivas, Laskin & Abbeel, ICML 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import fp32_loss


class BilinearInfoNCELoss(nn.Module):
    """InfoNCE with a learned bilinear similarity sim(q, k) = qᵀWk:

        l_ij = q_iᵀ W k_j − max_j' q_iᵀ W k_j'
        L = (1/N) Σ_i −log( exp(l_ii) / Σ_j exp(l_ij) )

    Positives on the diagonal, the other keys of the batch as negatives. Subtracting the
    row maximum (detached) does not change the loss but keeps exp in range.

    Attributes:
        W: [dim, dim] parameter, initialised to the identity (dot-product similarity).

    Examples:
        >>> loss_fn = BilinearInfoNCELoss(32)
        >>> loss = loss_fn(torch.randn(8, 32), torch.randn(8, 32))
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be ≥ 1, got {dim}")
        self.W = nn.Parameter(torch.eye(dim))

    @fp32_loss
    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: [N, dim] anchors; k: [N, dim] keys (row i the positive of q_i)."""
        if q.shape != k.shape or q.ndim != 2:
            raise ValueError(f"q and k must both be [N, dim], got {q.shape}, {k.shape}")
        logits = q @ self.W.to(q.dtype) @ k.T  # [N, N]
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        target = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, target)
