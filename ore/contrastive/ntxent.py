"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_denominator, check_temperature, fp32_loss
from ore.contrastive.distributed import all_gather, rank
from ore.contrastive.infonce import debiased_nce


class NTXentLoss(nn.Module):
    """SimCLR's loss over 2N views: each view's positive is the other view of its image,
    the remaining 2N − 2 views are negatives, and the self-pair is masked out:

        ℓ(i, j) = −log( exp(sim(z_i, z_j)/τ) / Σ_{k ≠ i} exp(sim(z_i, z_k)/τ) )
        L = (1/2N) Σ_{i=1}^{N} [ℓ(i, i+N) + ℓ(i+N, i)]

    with sim the cosine similarity. Equal similarities give L = −log(1/(2N − 1)).

    ``decoupled=True`` is DCL (Yeh et al., ECCV 2022): the positive leaves the denominator,
    ℓ(i, j) = −sim(z_i, z_j)/τ + log Σ_{k ∉ {i, j}} exp(sim(z_i, z_k)/τ), so an easy
    positive no longer shrinks the gradient of the negatives (the "negative-positive
    coupling" that makes small batches learn slowly). Equal similarities give log(2N − 2).

    ``debiased=τ⁺ > 0`` is the debiased loss of Chuang et al. (NeurIPS 2020): with a class
    prior τ⁺ (0.1 for ten balanced classes), the expected contribution of same-class
    "negatives" is estimated from the positive and removed from the denominator; see
    :func:`~ore.contrastive.infonce.debiased_nce`.

    With ``gather_distributed=True`` the keys are gathered from every process (gradients
    kept), so each anchor sees the 2·N·world − 2 negatives of the global batch; the loss
    is the mean over this process's anchors.

    Attributes:
        temperature: τ.
        gather_distributed: use negatives from all processes.
        decoupled: DCL's denominator without the positive.
        debiased: τ⁺ of the debiased loss (0: off).

    Examples:
        >>> z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss = NTXentLoss(temperature=0.5)(z1, z2)
    """

    def __init__(
        self, temperature: float = 0.5, gather_distributed: bool = False, *,
        decoupled: bool = False, debiased: float = 0.0,
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.gather_distributed = gather_distributed
        self.decoupled, self.debiased = check_denominator(decoupled, debiased)

    @fp32_loss
    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """z1, z2: [n, d], the two views of n images. Returns a scalar."""
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(f"z1 and z2 must both be [n, d], got {z1.shape}, {z2.shape}")
        n = z1.shape[0]
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        if self.gather_distributed:
            k1, k2 = all_gather(z1), all_gather(z2)  # [N, d] each, N = n·world
            offset = rank() * n
        else:
            k1, k2, offset = z1, z2, 0
        N = k1.shape[0]
        # 1/τ on the [2n, d] anchors rather than on the [2n, 2N] logits: one pass fewer.
        anchors = torch.cat([z1, z2]) * (1.0 / self.temperature)  # [2n, d]
        logits = anchors @ torch.cat([k1, k2]).T  # [2n, 2N]
        local = torch.arange(n, device=z1.device) + offset
        self_idx = torch.cat([local, local + N])  # column of each anchor itself
        pos_idx = torch.cat([local + N, local])  # column of its other view
        rows = torch.arange(2 * n, device=z1.device)
        # The self-pair gets −inf: exp(−inf) = 0 in the sum and a zero gradient. In place is
        # safe: the matmul's backward needs its inputs, not its output.
        logits[rows, self_idx] = float("-inf")
        if self.decoupled or self.debiased:
            pos = logits[rows, pos_idx]  # gathered (a copy) before the mask below
            logits[rows, pos_idx] = float("-inf")  # now only the 2N − 2 negatives remain
            if self.debiased:
                return debiased_nce(pos, logits, self.debiased, self.temperature).mean()
            return (torch.logsumexp(logits, dim=1) - pos).mean()
        return F.cross_entropy(logits, pos_idx)  # fused, max-shifted log-softmax
