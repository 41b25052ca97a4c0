"""Batched k-means in torch (Lloyd's algorithm with k-means++ seeding).

"Batched" means B independent problems solved together: shapes carry a leading batch
dimension B, n = points, d = dim, k = clusters. Used by PCL to cluster the memory of
momentum features at several granularities; runs on whatever device x lives on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sq_dists(x: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """Squared Euclidean distances [B, n, k] between x [B, n, d] and c [B, k, d]."""
    c_sq = (c * c).sum(-1)  # [B, k]
    out = []
    for s in range(0, x.shape[1], chunk):
        xs = x[:, s : s + chunk]
        d = (xs * xs).sum(-1, keepdim=True) - 2 * torch.einsum("bnd,bkd->bnk", xs, c)
        out.append((d + c_sq[:, None, :]).clamp_min_(0))
    return torch.cat(out, dim=1)


def _plus_plus_init(x: torch.Tensor, k: int, generator, chunk: int) -> torch.Tensor:
    B, n, _ = x.shape
    batch = torch.arange(B, device=x.device)
    first = torch.randint(n, (B,), device=x.device, generator=generator)
    centroids = [x[batch, first]]  # each [B, d]
    closest = _sq_dists(x, centroids[0][:, None], chunk)[..., 0]  # [B, n]
    for _ in range(1, k):
        # Sample the next seed with probability ∝ squared distance to the nearest seed.
        weights = closest + 1e-12  # a zero row (all points identical) still samples
        nxt = torch.multinomial(weights, 1, generator=generator)[:, 0]
        c = x[batch, nxt]
        centroids.append(c)
        closest = torch.minimum(closest, _sq_dists(x, c[:, None], chunk)[..., 0])
    return torch.stack(centroids, dim=1)  # [B, k, d]


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 20,
    spherical: bool = False,
    seed: int | None = 0,
    tol: float = 1e-6,
    chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster x into k groups.

    Args:
        x: [n, d] or [B, n, d] points (B independent problems).
        k: clusters per problem, 1 ≤ k ≤ n.
        iters: maximum Lloyd iterations.
        spherical: unit-normalise points and centroids (cosine k-means, as PCL uses).
        seed: seed of the k-means++ sampling (None: the global RNG).
        tol: stop when no centroid moves more than this (squared distance).
        chunk: points per distance block, bounding memory at B·chunk·k floats.
    Returns:
        centroids [(B,) k, d] and assignments [(B,) n] (int64).

    A cluster that loses all its points keeps its previous centroid.
    """
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected x of shape [n, d] or [B, n, d], got {tuple(x.shape)}")
    B, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if iters < 0:
        raise ValueError(f"iters must be ≥ 0, got {iters}")
    x = x.float()
    if spherical:
        x = F.normalize(x, dim=-1)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    c = _plus_plus_init(x, k, generator, chunk)
    assign = _sq_dists(x, c, chunk).argmin(-1)
    for _ in range(iters):
        sums = torch.zeros(B, k, d, device=x.device).scatter_add_(
            1, assign[..., None].expand(B, n, d), x
        )
        counts = torch.zeros(B, k, device=x.device).scatter_add_(
            1, assign, torch.ones(B, n, device=x.device)
        )
        new_c = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], c)
        if spherical:
            new_c = F.normalize(new_c, dim=-1)
        shift = ((new_c - c) ** 2).sum(-1).max()
        c = new_c
        assign = _sq_dists(x, c, chunk).argmin(-1)
        if shift <= tol:
            break
    if squeeze:
        return c[0], assign[0]
    return c, assign
