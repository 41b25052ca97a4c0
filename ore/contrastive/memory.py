"""State shared by momentum methods: the momentum update, a feature queue, and nearest
neighbours in a support set.

Shapes: n = batch, d = feature dim, K = queue size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_source for every parameter.

    Buffers (BatchNorm running statistics) are left alone: the key encoder's own forward
    passes keep them, as in MoCo. The two modules must have the same parameter layout.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params = list(target.parameters())
    s_params = list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(
            f"target has {len(t_params)} parameters but source has {len(s_params)}"
        )
    if not t_params:
        return
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)


class FeatureQueue(nn.Module):
    """A first-in-first-out ring buffer of feature vectors, kept as a module buffer.

    Attributes:
        size: capacity K.
        features: buffer [K, d]; allocated on the first :meth:`enqueue` when ``dim`` is
            ``None``.
        ptr: index of the next row to overwrite.
        num_filled: rows holding real features (≤ K).

    With ``random_init=True`` the buffer starts full of random unit vectors, as MoCo's
    queue does, so the first batches already see K negatives.

    Examples:
        >>> q = FeatureQueue(4, dim=2)
        >>> q.enqueue(torch.ones(3, 2)); q.enqueue(torch.zeros(2, 2))
        >>> q.get().shape, int(q.ptr)
        (torch.Size([4, 2]), 1)
    """

    def __init__(self, size: int, dim: int | None = None, *, random_init: bool = False):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be ≥ 1, got {size}")
        if dim is not None and dim < 1:
            raise ValueError(f"queue dim must be ≥ 1, got {dim}")
        self.size = int(size)
        self.random_init = random_init
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("features", None)
        if dim is not None:
            self._allocate(dim, torch.device("cpu"), torch.float32)

    def _allocate(self, dim: int, device, dtype) -> None:
        if self.random_init:
            feats = F.normalize(torch.randn(self.size, dim, device=device, dtype=dtype), dim=1)
            self.num_filled.fill_(self.size)
        else:
            feats = torch.zeros(self.size, dim, device=device, dtype=dtype)
        self.features = feats

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Write x [n, d] (detached) over the oldest rows, wrapping around at K."""
        x = x.detach()
        if self.features is None:
            self._allocate(x.shape[1], x.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != self.features.shape[1]:
            raise ValueError(
                f"expected features of shape [n, {self.features.shape[1]}], got {tuple(x.shape)}"
            )
        if x.shape[0] >= self.size:  # only the newest K survive
            x = x[-self.size:]
        n = x.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.features[idx.to(self.features.device)] = x.to(self.features.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.num_filled.copy_(torch.clamp(self.num_filled + n, max=self.size))

    def get(self) -> torch.Tensor:
        """The filled rows [≤K, d] (in storage order); empty [0, 0] before any enqueue."""
        if self.features is None:
            return torch.empty(0, 0)
        return self.features[: int(self.num_filled)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A lazily allocated buffer must exist before loading a saved one into it.
        key = prefix + "features"
        if self.features is None and state_dict.get(key) is not None:
            t = state_dict[key]
            self.features = torch.empty_like(t)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@torch.no_grad()
def nearest_neighbour(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The support row with the highest cosine similarity to each row of z.

    Args:
        z: [n, d] queries.
        support: [K, d] support set.
    Returns:
        [n, d] rows of ``support`` (no gradient flows into the support set).
    """
    sim = F.normalize(z, dim=1) @ F.normalize(support, dim=1).T  # [n, K]
    return support[sim.argmax(dim=1)]
