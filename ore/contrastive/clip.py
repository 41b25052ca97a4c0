"""CLIP's symmetric contrastive loss (Radford et al., ICML 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_temperature, fp32_loss


class CLIPLoss(nn.Module):
    """Symmetric cross-entropy over the N×N cosine similarities of paired embeddings:

        l_ij = cos(u_i, v_j) / τ
        L = ½ [ (1/N) Σ_i −log softmax_j(l_ij)[i] + (1/N) Σ_j −log softmax_i(l_ij)[j] ]

    τ is learned as ``logit_scale = log(1/τ)``, with 1/τ clipped at 100 as in CLIP.

    Attributes:
        logit_scale: log(1/τ), a parameter when ``learn_temperature`` else a buffer.

    Examples:
        >>> loss_fn = CLIPLoss(init_temperature=0.07)
        >>> loss = loss_fn(torch.randn(8, 64), torch.randn(8, 64))
    """

    max_scale = 100.0

    def __init__(self, init_temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__()
        t = check_temperature(init_temperature, "init_temperature")
        if 1.0 / t > self.max_scale:
            raise ValueError(f"init_temperature must be ≥ {1 / self.max_scale}, got {t}")
        scale = torch.tensor(math.log(1.0 / t))
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().exp().clamp(max=self.max_scale))

    @fp32_loss
    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """image_emb, text_emb: [N, D], row i of each a matching pair. Returns a scalar."""
        if image_emb.shape[0] != text_emb.shape[0]:
            raise ValueError(
                f"need as many texts as images, got {image_emb.shape}, {text_emb.shape}"
            )
        u, v = F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)
        scale = self.logit_scale.to(u.dtype).exp().clamp(max=self.max_scale)
        logits = scale * u @ v.T  # [N, N]
        target = torch.arange(u.shape[0], device=u.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
