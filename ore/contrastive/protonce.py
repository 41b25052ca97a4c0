"""ProtoNCE, the loss of Prototypical Contrastive Learning (Li et al., ICLR 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_temperature, fp32_loss
from ore.contrastive.clustering import kmeans
from ore.contrastive.infonce import info_nce


class ProtoNCELoss(nn.Module):
    """InfoNCE on instances plus InfoNCE on prototypes at M clusterings:

        L = L_InfoNCE(q, k⁺, K⁻)
            + (1/M) Σ_{m=1}^{M} −log( exp(q·c_s^m/φ_s^m) / Σ_{j=1}^{k_m} exp(q·c_j^m/φ_j^m) )

    where c^m are the spherical k-means centroids of a memory of momentum features (one
    row per training image, written by ``forward(..., index=...)``), s is the cluster of
    the query's image, and the concentration of cluster c with members Z is

        φ = Σ_{z∈Z} ‖v_z − c‖₂ / (|Z| · log(|Z| + α)),

    single-member clusters get the largest φ, then φ is clipped to its 10th–90th
    percentiles and rescaled to mean τ (as in PCL's reference code). Prototype terms are
    absent until :meth:`update_prototypes` has run (PCL warms up on instances only).

    Shapes: N = batch, D = dim, M = negatives, S = memory size.

    Attributes:
        temperature: τ for the instance term and the mean concentration.
        num_clusters: cluster counts k_1…k_M.
        memory: buffer [S, D] of momentum features (``memory_size`` rows; 0 disables it).
        prototypes / concentrations / assignments: per clustering, set by
            :meth:`update_prototypes`.

    Examples:
        >>> loss_fn = ProtoNCELoss(temperature=0.1, num_clusters=(4, 8), memory_size=64)
        >>> q, k = torch.randn(16, 32), torch.randn(16, 32)
        >>> loss = loss_fn(q, k, index=torch.arange(16))  # instance term, fills memory
        >>> loss_fn.update_prototypes()  # clusters the 16 filled rows
        >>> loss = loss_fn(q, k, index=torch.arange(16))  # now with prototype terms
    """

    def __init__(
        self,
        temperature: float = 0.1,
        num_clusters: tuple[int, ...] = (250, 500, 1000),
        *,
        memory_size: int = 0,
        alpha: float = 10.0,
        kmeans_iters: int = 20,
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        num_clusters = tuple(int(k) for k in num_clusters)
        if not num_clusters or min(num_clusters) < 2:
            raise ValueError(f"num_clusters must be non-empty ints ≥ 2, got {num_clusters}")
        if memory_size < 0:
            raise ValueError(f"memory_size must be ≥ 0, got {memory_size}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.num_clusters = num_clusters
        self.alpha = float(alpha)
        self.kmeans_iters = kmeans_iters
        self.memory_size = memory_size
        self.register_buffer("memory", None)
        self.register_buffer("filled", torch.zeros(memory_size, dtype=torch.bool))
        self.prototypes: list[torch.Tensor] = []
        self.concentrations: list[torch.Tensor] = []
        self.assignments: list[torch.Tensor] = []

    @torch.no_grad()
    def update_memory(self, index: torch.Tensor, k: torch.Tensor) -> None:
        """Write momentum features k [N, D] (normalised, detached) at rows ``index``."""
        if self.memory_size == 0:
            raise ValueError("this ProtoNCELoss was built with memory_size=0 (no memory)")
        if self.memory is None:
            self.memory = torch.zeros(self.memory_size, k.shape[1], device=k.device)
        self.memory[index] = F.normalize(k.detach().float(), dim=1)
        self.filled[index] = True

    @torch.no_grad()
    def update_prototypes(self, features: torch.Tensor | None = None, *, seed: int = 0) -> None:
        """Cluster ``features`` [S, D] (default: the filled memory rows) at every k_m.

        Row i of ``features`` (or memory row i) is the image with ``index`` i.
        """
        if features is None:
            if self.memory is None or not bool(self.filled.any()):
                raise ValueError("the memory is empty: call forward(..., index=...) first")
            rows = self.filled.nonzero()[:, 0]
            features, size = self.memory[rows], self.memory_size
        else:
            rows = torch.arange(features.shape[0], device=features.device)
            size = features.shape[0]
        v = F.normalize(features.float(), dim=1)
        self.prototypes, self.concentrations, self.assignments = [], [], []
        for m, k in enumerate(self.num_clusters):
            k = min(k, v.shape[0])
            c, a = kmeans(v, k, iters=self.kmeans_iters, spherical=True, seed=seed + m)
            dist = (v - c[a]).norm(dim=1)  # [S]
            count = torch.bincount(a, minlength=k).float()
            dsum = torch.zeros(k, device=v.device).scatter_add_(0, a, dist)
            phi = dsum / (count.clamp_min(1) * torch.log(count + self.alpha))
            multi = count > 1
            dmax = phi[multi].max() if bool(multi.any()) else torch.tensor(1.0, device=v.device)
            phi = torch.where(multi, phi, dmax)
            lo, hi = torch.quantile(phi, 0.1), torch.quantile(phi, 0.9)
            phi = phi.clamp(lo, hi)
            phi = self.temperature * phi / phi.mean().clamp_min(1e-12)
            full = torch.full((size,), -1, dtype=torch.long, device=v.device)
            full[rows] = a
            self.prototypes.append(c)
            self.concentrations.append(phi.clamp_min(1e-4))
            self.assignments.append(full)

    @fp32_loss
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        negatives: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [N, D] queries; k: [N, D] momentum keys; negatives: [M, D] (None: the other
        keys of the batch); index: [N] image ids for the memory and prototype lookup."""
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        if negatives is None:
            logits = q @ k.T / self.temperature  # in-batch negatives
            loss = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
        else:
            loss = info_nce(q, k, F.normalize(negatives, dim=1), self.temperature).mean()
        if index is not None and self.prototypes:
            proto_losses = []
            for c, phi, assign in zip(self.prototypes, self.concentrations, self.assignments):
                target = assign.to(index.device)[index]  # [N], −1 if never clustered
                valid = target >= 0
                if not bool(valid.any()):
                    continue
                logits = (q[valid] @ c.to(q.dtype).T) / phi.to(q.dtype)  # [N', k_m]
                proto_losses.append(F.cross_entropy(logits, target[valid]))
            if proto_losses:
                loss = loss + torch.stack(proto_losses).mean()
        if index is not None and self.memory_size and self.training:
            self.update_memory(index, k)
        return loss

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, num_clusters={self.num_clusters}, "
            f"memory_size={self.memory_size}, log_alpha={math.log(self.alpha):.3f}"
        )
