"""InfoNCE (van den Oord et al., CPC, 2018): one positive key against negative keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_temperature, fp32_loss


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    *,
    decoupled: bool = False,
) -> torch.Tensor:
    """Per-query InfoNCE [N] on already-normalised (or raw) vectors.

    ℓ_i = −log( exp(q_i·k⁺_i/τ) / (exp(q_i·k⁺_i/τ) + Σ_m exp(q_i·k⁻_m/τ)) )
        = logsumexp_j(l_ij) − l_i0, with l_i0 the positive logit.

    ``decoupled=True`` drops the positive from the denominator (DCL, Yeh et al., ECCV
    2022): ℓ_i = logsumexp_m(q_i·k⁻_m/τ) − q_i·k⁺_i/τ. Then an easy positive no longer
    scales down the gradient of its negatives, which matters most for small batches.
    """
    if negatives.ndim not in (2, 3):
        raise ValueError(f"negatives must be [M, D] or [N, M, D], got {tuple(negatives.shape)}")
    query = query * (1.0 / temperature)  # scale [N, D] once instead of the [N, 1 + M] logits
    pos = (query * positive).sum(-1, keepdim=True)  # [N, 1]
    if negatives.ndim == 2:  # shared negatives [M, D]
        neg = query @ negatives.T  # [N, M]
    else:  # per-query negatives [N, M, D]
        neg = torch.einsum("nd,nmd->nm", query, negatives)
    if decoupled:
        return torch.logsumexp(neg, dim=1) - pos[:, 0]
    logits = torch.cat([pos, neg], dim=1)  # [N, 1 + M]
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


class InfoNCELoss(nn.Module):
    """Cross-entropy of picking the positive key (class 0) among 1 + M keys:

        L = (1/N) Σ_i −log( exp(s(q_i, k⁺_i)/τ) / Σ_{k ∈ {k⁺_i} ∪ K⁻} exp(s(q_i, k)/τ) )

    with s the cosine similarity (``normalize=True``) or the dot product. Logits are
    computed in fp32 and reduced with logsumexp, so τ = 0.01 and bf16 inputs are safe.

    Attributes:
        temperature: τ.
        normalize: L2-normalise query and keys first.
        decoupled: leave the positive out of the denominator (DCL, see :func:`info_nce`).

    Examples:
        >>> q, k = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = InfoNCELoss(temperature=0.1)(q, k, torch.randn(100, 16))
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True, *,
                 decoupled: bool = False):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.normalize = normalize
        self.decoupled = bool(decoupled)

    @fp32_loss
    def forward(
        self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        """query, positive: [N, D]; negatives: [N, M, D] or shared [M, D]. Returns a scalar."""
        if query.shape != positive.shape or query.ndim != 2:
            raise ValueError(
                f"query and positive must be [N, D], got {query.shape}, {positive.shape}"
            )
        if self.normalize:
            query, positive = F.normalize(query, dim=-1), F.normalize(positive, dim=-1)
            negatives = F.normalize(negatives, dim=-1)
        return info_nce(query, positive, negatives, self.temperature,
                        decoupled=self.decoupled).mean()
