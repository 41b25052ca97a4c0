"""Collectives over processes: the one distributed helper of the package.

Every function degrades to the identity (or the trivial answer) when
``torch.distributed`` is not initialised or the world has one process, so code that
calls them runs unchanged on one CPU. The contrastive losses, the prototype store and
the training loops all use these; nothing here starts or joins a process group (the
engine does that).

``torch.distributed.all_gather`` returns tensors detached from the graph, so a loss that
uses every process's features as negatives would only train on its own slice.
:func:`all_gather` keeps gradients: its backward all-reduces the incoming gradients and
hands each process the part that belongs to its own input, which with DDP's gradient
averaging gives exactly the gradient of the mean loss over the global batch.
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


@torch.no_grad()
def all_gather_rows(features: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n_r, D] and their labels [n_r] (≥ 0) of every process, in rank order.

    Unlike :func:`all_gather_no_grad`, processes may hold different numbers of rows:
    each pads to the largest count with label −1, and the padding is dropped after.
    """
    if world_size() == 1:
        return features, labels
    world = world_size()
    size = torch.tensor([len(labels)], device=labels.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    m = int(torch.stack(sizes).max())
    f = features.new_zeros(m, features.shape[1])
    f[: len(features)] = features
    lab = labels.new_full((m,), -1)
    lab[: len(labels)] = labels
    f_all, lab_all = all_gather_no_grad(f), all_gather_no_grad(lab)
    keep = lab_all >= 0
    return f_all[keep], lab_all[keep]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over processes of a small tensor (a detached copy; ``values`` is untouched)."""
    out = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out)
    return out


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a small tensor (a detached copy)."""
    return all_reduce_sum(values) / world_size() if world_size() > 1 else values.detach().clone()


def broadcast_tensor(values: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Process ``src``'s ``values`` on every process (a copy)."""
    out = values.detach().clone()
    if world_size() > 1:
        dist.broadcast(out, src)
    return out


def gather_objects(obj) -> list:
    """Every process's picklable ``obj`` in rank order (on every process)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Process ``src``'s picklable ``obj`` on every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
