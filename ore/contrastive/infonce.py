"""InfoNCE (van den Oord et al., CPC, 2018): one positive key against negative keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_denominator, check_tau_plus, check_temperature, fp32_loss


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    *,
    decoupled: bool = False,
    debiased: float = 0.0,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query InfoNCE [N] on already-normalised (or raw) vectors.

    ℓ_i = −log( exp(q_i·k⁺_i/τ) / (exp(q_i·k⁺_i/τ) + Σ_m exp(q_i·k⁻_m/τ)) )
        = logsumexp_j(l_ij) − l_i0, with l_i0 the positive logit.

    ``decoupled=True`` drops the positive from the denominator (DCL, Yeh et al., ECCV
    2022): ℓ_i = logsumexp_m(q_i·k⁻_m/τ) − q_i·k⁺_i/τ. Then an easy positive no longer
    scales down the gradient of its negatives, which matters most for small batches.
    ``debiased=τ⁺ > 0`` is the debiased loss (:func:`debiased_nce`). ``exclude`` [N, M]
    (bool) drops negative m from query n's sum where True, e.g. shared negatives that
    include query n's own image.
    """
    decoupled, debiased = check_denominator(decoupled, debiased)
    if negatives.ndim not in (2, 3):
        raise ValueError(f"negatives must be [M, D] or [N, M, D], got {tuple(negatives.shape)}")
    m = negatives.shape[-2]
    if exclude is not None and exclude.shape != (query.shape[0], m):
        raise ValueError(f"exclude must be [N, M] = {(query.shape[0], m)}, "
                         f"got {tuple(exclude.shape)}")
    query = query * (1.0 / temperature)  # scale [N, D] once instead of the [N, 1 + M] logits
    pos = (query * positive).sum(-1, keepdim=True)  # [N, 1]
    if negatives.ndim == 2:  # shared negatives [M, D]
        neg = query @ negatives.T  # [N, M]
    else:  # per-query negatives [N, M, D]
        neg = torch.einsum("nd,nmd->nm", query, negatives)
    if exclude is not None:
        neg = neg.masked_fill(exclude, -math.inf)
    if decoupled:
        return torch.logsumexp(neg, dim=1) - pos[:, 0]
    if debiased:
        return debiased_nce(pos[:, 0], neg, debiased, temperature)
    logits = torch.cat([pos, neg], dim=1)  # [N, 1 + M]
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def debiased_nce(
    pos: torch.Tensor, neg: torch.Tensor, tau_plus: float, temperature: float
) -> torch.Tensor:
    """Per-anchor debiased contrastive loss [N] (Chuang et al., NeurIPS 2020) from logits
    that are already divided by τ: ``pos`` [N] and ``neg`` [N, M], where −inf marks a
    column that is not a negative of its row.

    With a class prior τ⁺, a fraction τ⁺ of the M "negatives" share the anchor's class.
    Their expected share of Σ exp(neg) is estimated from the positive and subtracted:

        g = max( (Σ_m exp(neg_m) − τ⁺·M·exp(pos)) / (1 − τ⁺),  M·exp(−1/τ) )
        ℓ = −log( exp(pos) / (exp(pos) + g) )

    (M counted per row; exp(−1/τ) is the smallest value exp(sim/τ) can take). Computed in
    log space, so τ = 0.01 neither overflows nor divides 0 by 0. τ⁺ = 0 is the plain
    InfoNCE loss whenever the floor does not bind.
    """
    tau_plus = check_tau_plus(tau_plus)
    count = torch.isfinite(neg).sum(dim=1).clamp_min(1).to(neg.dtype)  # M per row
    lse = torch.logsumexp(neg, dim=1)  # log Σ exp(neg)
    floor = count.log() - 1.0 / temperature  # log(M·exp(−1/τ))
    if tau_plus > 0:
        # log(e^lse − e^b) = lse + log(−expm1(b − lse)) where b = log(τ⁺M) + pos < lse;
        # otherwise the estimate is ≤ 0 and the floor applies. d is kept away from 0 in
        # the unused branch so that its gradient (multiplied by 0) stays finite.
        d = math.log(tau_plus) + count.log() + pos - lse
        ok = d < -1e-6
        est = lse + torch.log(-torch.expm1(torch.where(ok, d, torch.full_like(d, -1.0))))
        est = torch.where(ok, est - math.log1p(-tau_plus), torch.full_like(est, -math.inf))
    else:
        est = lse
    log_g = torch.maximum(est, floor)
    return F.softplus(log_g - pos)  # log(1 + g/exp(pos))


class InfoNCELoss(nn.Module):
    """Cross-entropy of picking the positive key (class 0) among 1 + M keys:

        L = (1/N) Σ_i −log( exp(s(q_i, k⁺_i)/τ) / Σ_{k ∈ {k⁺_i} ∪ K⁻} exp(s(q_i, k)/τ) )

    with s the cosine similarity (``normalize=True``) or the dot product. Logits are
    computed in fp32 and reduced with logsumexp, so τ = 0.01 and bf16 inputs are safe.

    Attributes:
        temperature: τ.
        normalize: L2-normalise query and keys first.
        decoupled: leave the positive out of the denominator (DCL, see :func:`info_nce`).
        debiased: τ⁺ of the debiased loss (:func:`debiased_nce`; 0: off).

    Examples:
        >>> q, k = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = InfoNCELoss(temperature=0.1)(q, k, torch.randn(100, 16))
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True, *,
                 decoupled: bool = False, debiased: float = 0.0):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.normalize = normalize
        self.decoupled, self.debiased = check_denominator(decoupled, debiased)

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
                        decoupled=self.decoupled, debiased=self.debiased).mean()
