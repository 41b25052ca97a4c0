"""Gathering tensors across processes while keeping gradients.

``torch.distributed.all_gather`` returns tensors detached from the graph, so a loss that
uses every process's features as negatives would only train on its own slice. Here the
backward pass all-reduces the incoming gradients and hands each process the part that
belongs to its own input: with DDP's gradient averaging this gives exactly the gradient
of the mean loss over the global batch.

Everything degrades to the identity when ``torch.distributed`` is not initialised or the
world has one process, so modules that call it run unchanged on one CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default group, 1 when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group, 0 when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        # Every process computed a loss from every slice; the gradient of a slice is the
        # sum over processes of what their losses sent back to it.
        all_grads = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n, ...] from every process along dim 0, keeping gradients.

    Every process must pass the same shape. Returns [world_size·n, ...] with this
    process's rows at ``rank()·n``; ``x`` itself when not running distributed.
    """
    if world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather` but detached (for queues and memories)."""
    if world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)
