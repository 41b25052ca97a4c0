"""Supervised contrastive loss (Khosla et al., NeurIPS 2020), the L_out^sup form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_temperature, fp32_loss
from ore.contrastive.distributed import all_gather, all_gather_no_grad, rank


class SupConLoss(nn.Module):
    """Every view with the anchor's label is a positive; the average sits outside the log:

        L = (1/|I|) Σ_{i∈I} −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )

    over the NV views I (features unit-normalised), A(i) = I \\ {i},
    P(i) = {p ∈ A(i) : y_p = y_i}. Anchors with no positive (one view, a unique label)
    are left out of the mean. Without labels every image is its own class, which is
    SimCLR's NT-Xent for V = 2.

    Attributes:
        temperature: τ.
        gather_distributed: contrast against the views of every process (gradients kept).

    Examples:
        >>> feats = torch.randn(8, 2, 128)  # N images, V views, D dims
        >>> loss = SupConLoss(temperature=0.1)(feats, torch.randint(3, (8,)))
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.gather_distributed = gather_distributed

    @fp32_loss
    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """features: [N, V, D]; labels: [N] (None: each image its own class). Returns a scalar."""
        if features.ndim != 3:
            raise ValueError(f"features must be [N, V, D], got {tuple(features.shape)}")
        N, V, _ = features.shape
        if labels is None:
            labels = torch.arange(N, device=features.device) + rank() * N
        elif labels.shape != (N,):
            raise ValueError(f"labels must be [N={N}], got {tuple(labels.shape)}")
        z = F.normalize(features, dim=-1)
        anchors = z.transpose(0, 1).reshape(V * N, -1)  # view-major [VN, D]
        anchor_labels = labels.repeat(V)  # [VN]
        if self.gather_distributed:
            keys = all_gather(z).transpose(0, 1).reshape(-1, z.shape[-1])  # [V·N·world, D]
            key_labels = all_gather_no_grad(labels).repeat(V)
            n_all = key_labels.shape[0] // V
            # Anchor (v, i) sits at column v·n_all + rank·N + i among the gathered keys.
            self_col = (
                torch.arange(V, device=z.device)[:, None] * n_all
                + rank() * N
                + torch.arange(N, device=z.device)[None]
            ).reshape(-1)
        else:
            keys, key_labels = anchors, anchor_labels
            self_col = torch.arange(V * N, device=z.device)
        logits = anchors @ keys.T / self.temperature  # [VN, K]
        rows = torch.arange(V * N, device=z.device)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[rows, self_col] = True
        log_denom = torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1)  # [VN]
        pos = (anchor_labels[:, None] == key_labels[None, :]) & ~is_self  # [VN, K]
        n_pos = pos.sum(1)
        # Σ_p log_prob = Σ_p logits_ip − |P(i)|·log_denom_i (no −inf enters the sum)
        pos_logit_sum = torch.where(pos, logits, torch.zeros_like(logits)).sum(1)
        has_pos = n_pos > 0
        per_anchor = -(pos_logit_sum - n_pos * log_denom) / n_pos.clamp_min(1)
        if not bool(has_pos.any()):
            return logits.sum() * 0.0
        return per_anchor[has_pos].mean()
