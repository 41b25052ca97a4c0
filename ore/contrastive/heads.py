"""Projection and prediction heads: small MLPs on top of a pooled trunk.

SimCLR puts the loss on g(h) rather than on the trunk output h; the trunk features kept
for detection are the ones before this head, which is why the head is never saved with
the backbone weights.
"""

from __future__ import annotations

from torch import nn


class ProjectionHead(nn.Sequential):
    """Linear → (BatchNorm) → ReLU, repeated, then a final Linear (optionally BatchNorm).

    Args:
        in_dim: input features (the trunk's channels).
        hidden_dim: width of the hidden layers.
        out_dim: output features d.
        num_layers: number of Linear layers (≥ 1).
        batch_norm: BatchNorm1d after each hidden Linear.
        last_batch_norm: BatchNorm1d (no affine) after the last Linear, as SimSiam/NNCLR do.

    Examples:
        >>> head = ProjectionHead(512, 2048, 128)
        >>> head(torch.randn(8, 512)).shape
        torch.Size([8, 128])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        *,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_batch_norm: bool = False,
    ):
        if num_layers < 1:
            raise ValueError(f"num_layers must be ≥ 1, got {num_layers}")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"dims must be ≥ 1, got {(in_dim, hidden_dim, out_dim)}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(d, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim, bias=not last_batch_norm))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)


def PredictionHead(dim: int = 128, hidden_dim: int = 512) -> ProjectionHead:  # noqa: N802
    """BYOL/NNCLR predictor: a two-layer MLP from d to d."""
    return ProjectionHead(dim, hidden_dim, dim, num_layers=2)
