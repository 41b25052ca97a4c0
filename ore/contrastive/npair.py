"""Multi-class N-pair loss (Sohn, NeurIPS 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import fp32_loss


class NPairLoss(nn.Module):
    """One positive against M negatives, with raw dot products:

        L = (1/N) Σ_i log(1 + Σ_m exp(a_i·n_im − a_i·p_i))

    computed as logsumexp over [0, a·n_1 − a·p, …, a·n_M − a·p], which never overflows.
    (Sohn's paper adds an L2 penalty on the embeddings; add it outside if wanted.)

    Shapes: N = anchors, M = negatives per anchor, D = dim.

    Examples:
        >>> a, p = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = NPairLoss()(a, p, torch.randn(8, 5, 16))
    """

    @fp32_loss
    def forward(
        self, anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        """anchor, positive: [N, D]; negatives: [N, M, D]. Returns a scalar."""
        if negatives.ndim != 3 or negatives.shape[0] != anchor.shape[0]:
            raise ValueError(f"negatives must be [N, M, D], got {tuple(negatives.shape)}")
        pos = (anchor * positive).sum(-1, keepdim=True)  # [N, 1]
        neg = torch.einsum("nd,nmd->nm", anchor, negatives)  # [N, M]
        # log(1 + Σ exp(neg − pos)) = logsumexp([0, neg − pos]) = softplus for M = 1.
        diff = F.pad(neg - pos, (1, 0))  # leading zero column
        return torch.logsumexp(diff, dim=1).mean()
