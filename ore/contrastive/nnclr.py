"""NNCLR (Dwibedi et al., ICCV 2021): nearest neighbours from a support set as positives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_temperature, fp32_loss
from ore.contrastive.memory import FeatureQueue, nearest_neighbour


def _cross_view_ce(anchors: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean −log softmax of the diagonal of anchors·keysᵀ/τ (both unit-normalised)."""
    logits = anchors @ keys.T / temperature  # [n, n]
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


class NNCLRLoss(nn.Module):
    """InfoNCE where the positive of view 2 is the support-set neighbour of view 1:

        ℓ_i = −log( exp(NN(z1_i)·z2_i/τ) / Σ_k exp(NN(z1_i)·z2_k/τ) )
        L = ½ [ℓ(NN(z1), z2) + ℓ(NN(z2), z1)]

    with NN(z) = argmax_{s∈Q} cos(z, s) over the support queue Q and all vectors
    unit-normalised. After the loss the queue receives z1 (detached). While the queue is
    empty, NN(z) = z (plain cross-view InfoNCE). If predictor outputs p1, p2 are given
    they take the place of z1, z2 on the query side, as in the paper.

    Attributes:
        temperature: τ.
        support: the FIFO support set (a :class:`FeatureQueue` of ``queue_size`` rows).

    Examples:
        >>> loss_fn = NNCLRLoss(temperature=0.1, queue_size=1024)
        >>> loss = loss_fn(torch.randn(8, 128), torch.randn(8, 128))
    """

    def __init__(self, temperature: float = 0.1, queue_size: int = 98304):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.support = FeatureQueue(queue_size)

    @fp32_loss
    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        p1: torch.Tensor | None = None,
        p2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z1, z2: [n, d] projections of two views; p1, p2: optional predictions [n, d]."""
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(f"z1 and z2 must both be [n, d], got {z1.shape}, {z2.shape}")
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        q1 = z1 if p1 is None else F.normalize(p1, dim=1)
        q2 = z2 if p2 is None else F.normalize(p2, dim=1)
        support = self.support.get()
        if support.numel() == 0:
            nn1, nn2 = z1.detach(), z2.detach()
        else:
            support = support.to(z1.dtype)
            nn1, nn2 = nearest_neighbour(z1, support), nearest_neighbour(z2, support)
        loss = 0.5 * (
            _cross_view_ce(nn1, q2, self.temperature) + _cross_view_ce(nn2, q1, self.temperature)
        )
        if self.training:
            self.support.enqueue(z1)
        return loss
