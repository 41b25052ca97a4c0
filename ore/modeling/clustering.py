"""Contrastive clustering of RoI features around class prototypes (SPEC §3.2).

Shapes: N foreground features of width D; C = K + 1 stored classes (the K known classes
and ``unknown``), indexed by ``label - 1``, plus a background row C when the store keeps
one; Q items per class queue.

A per-class feature store keeps the Q most recent features of each class. Prototypes are
initialised as the mean of each queue once ``start_iter`` is reached and then moved with
momentum η every ``update_every`` iterations: p ← η·p + (1 − η)·mean(queue). A class whose
queue is empty has no prototype and takes no part in the loss (the reference used a zero
vector). For a feature f of class c:

    L(f) = Σ_i ℓ(f, p_i),   ℓ = D(f, p_c)                 if i = c
                             ℓ = max(0, Δ − D(f, p_i))     otherwise

with D the Minkowski distance of order ``distance_p`` (2 = Euclidean) and Δ the margin.
The loss is the mean of L(f) over the features (``reduction="sum"``), or the mean of
the N × C terms ℓ(f, p_i) (``"mean"``, the reference's average, where a row without a
prototype counts 0).

The reference as run (SPEC §9) is ``init="zero"``, ``phase="multiples"``, a background
row, ``reduction="mean"``: at ``start_iter`` every prototype is reset, to its queue mean
or to zero where the queue is empty (a class not seen yet, and so every new class of a
task), every row takes part in the loss, and at each update a zero prototype moves (1 − η)
of the way to its queue mean once the queue holds features.

With ``torch.distributed`` initialised, every process enqueues the features of all
processes (gathered in rank order), so queues and prototypes are identical everywhere;
DDP's buffer broadcast then changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ore.contrastive.distributed import all_gather_rows

REDUCTIONS = ("sum", "mean")
PROTOTYPE_INITS = ("mean", "zero")
UPDATE_PHASES = ("after_start", "multiples")


def clustering_loss(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
    valid: torch.Tensor, *, margin: float, p: float = 2.0, reduction: str = "sum",
) -> torch.Tensor:
    """Mean over features of Σ_i ℓ(f, p_i), or with ``reduction="mean"`` the mean of the
    N × C terms ℓ(f, p_i) (see the module docstring).

    Args:
        features: [N, D] foreground features.
        labels: [N] class rows (0..C-1) of the features.
        prototypes: [C, D].
        valid: [C] bool; prototypes that exist.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: expected one of {REDUCTIONS}")
    if features.numel() == 0 or not bool(valid.any()):
        return features.float().sum() * 0.0
    # Always in fp32, also under mixed-precision autocast: distances of wide features.
    with torch.autocast(device_type=features.device.type, enabled=False):
        dist_ = torch.cdist(features.float(), prototypes.float(), p=p)  # [N, C]
        own = nn.functional.one_hot(labels, prototypes.shape[0]).bool()  # [N, C]
        per_pair = torch.where(own, dist_, (margin - dist_).clamp(min=0))
        per_pair = per_pair * valid.to(per_pair.dtype)  # classes without a prototype drop out
        if reduction == "mean":
            return per_pair.mean()
        return per_pair.sum(dim=1).mean()


class PrototypeStore(nn.Module):
    """Feature queues and prototypes as buffers, so they live in the checkpoint.

    Args:
        num_classes: C, the number of stored classes (known classes + unknown).
        dim: feature width D.
        items_per_class: queue length Q (reference: 20).
        momentum: η for prototype updates (reference: 0.99).
        start_iter: iteration at which prototypes are first computed.
        update_every: prototypes move every this many iterations.
        init: ``mean`` (a prototype starts at its class's first queue mean and is kept) |
            ``zero`` (all reset at ``start_iter``; zero where a queue is empty; all valid).
        phase: ``after_start`` (updates at ``start_iter + k·update_every``) | ``multiples``
            (at multiples of ``update_every``).
    """

    def __init__(self, num_classes: int, dim: int, *, items_per_class: int = 20,
                 momentum: float = 0.99, start_iter: int = 1000, update_every: int = 3000,
                 init: str = "mean", phase: str = "after_start"):
        super().__init__()
        if items_per_class < 1 or update_every < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"bad clustering settings: items_per_class={items_per_class}, "
                f"update_every={update_every}, momentum={momentum}"
            )
        if init not in PROTOTYPE_INITS:
            raise ValueError(f"init {init!r}: expected one of {PROTOTYPE_INITS}")
        if phase not in UPDATE_PHASES:
            raise ValueError(f"phase {phase!r}: expected one of {UPDATE_PHASES}")
        self.items_per_class, self.momentum = items_per_class, momentum
        self.start_iter, self.update_every = start_iter, update_every
        self.init, self.phase = init, phase
        self.register_buffer("queue", torch.zeros(num_classes, items_per_class, dim))
        self.register_buffer("queue_len", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("valid", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Push features [N, D] into the queues of their class rows [N] (oldest overwritten);
        under ``torch.distributed`` the features of every process."""
        features, labels = all_gather_rows(features, labels)
        q = self.items_per_class
        for c in labels.unique().tolist():  # a loop over classes present, not over features
            f = features[labels == c][-q:].to(self.queue.dtype)
            n = f.shape[0]
            slots = (self.queue_ptr[c] + torch.arange(n, device=f.device)) % q
            self.queue[c, slots] = f
            self.queue_ptr[c] = (self.queue_ptr[c] + n) % q
            self.queue_len[c] = torch.clamp(self.queue_len[c] + n, max=q)

    @torch.no_grad()
    def queue_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class mean of the stored features [C, D] and whether any exist [C]."""
        slot = torch.arange(self.items_per_class, device=self.queue.device)
        filled = (slot[None, :] < self.queue_len[:, None]).to(self.queue.dtype)  # [C, Q]
        sums = (self.queue * filled[..., None]).sum(dim=1)  # [C, D]
        counts = filled.sum(dim=1)  # [C]
        has = counts > 0
        return sums / counts.clamp(min=1)[:, None], has

    @property
    def takes_batch_first(self) -> bool:
        """Whether an iteration's features enter the queues before its prototypes are
        computed (``init="zero"``, as the reference) rather than after its loss."""
        return self.init == "zero"

    def is_update(self, iteration: int) -> bool:
        """Whether prototypes are computed at ``iteration``."""
        if iteration < self.start_iter:
            return False
        if iteration == self.start_iter:
            return True
        offset = iteration - self.start_iter if self.phase == "after_start" else iteration
        return offset % self.update_every == 0

    @torch.no_grad()
    def step(self, iteration: int) -> None:
        """Initialise prototypes at ``start_iter``; move them at each update iteration."""
        if not self.is_update(iteration):
            return
        means, has = self.queue_means()
        moved = self.momentum * self.prototypes + (1 - self.momentum) * means
        if self.init == "zero":
            if iteration == self.start_iter:
                self.prototypes.copy_(means * has[:, None].to(means.dtype))
                self.valid.fill_(True)
            else:
                self.prototypes.copy_(torch.where(has[:, None], moved, self.prototypes))
                # Rows added since the reset (a task started past start_iter) join at zero.
                self.valid.fill_(True)
            return
        # A class seen for the first time starts at its queue mean; others move with momentum.
        new = torch.where(self.valid[:, None], moved, means)
        self.prototypes.copy_(torch.where(has[:, None], new, self.prototypes))
        self.valid |= has
