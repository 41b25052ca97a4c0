"""The five pretraining methods of ``ore pretrain`` as modules over one trunk.

Each method owns ``trunk`` (the backbone that is saved), its heads and its loss, and maps
two augmented views (plus labels and dataset indices) to a scalar loss. Only ``trunk`` is
written to the output; heads, key encoders and queues are training scaffolding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive.dense import DenseInfoNCELoss
from ore.contrastive.heads import PredictionHead, ProjectionHead
from ore.contrastive.memory import FeatureQueue, momentum_update
from ore.contrastive.moco import MoCo
from ore.contrastive.nnclr import NNCLRLoss
from ore.contrastive.ntxent import NTXentLoss
from ore.contrastive.protonce import ProtoNCELoss
from ore.contrastive.supcon import SupConLoss

METHODS = ("simclr", "moco", "nnclr", "pcl", "supcon")
# Methods on feature maps rather than pooled features: they need the views' crop boxes
# and a module giving dense maps (:class:`DenseContrast`).
DENSE_METHODS = ("dense",)
# Methods whose losses gather features across processes (torchrun). NNCLR's support queue
# and PCL's memory and k-means would need their own gathering.
MULTI_PROCESS_METHODS = ("simclr", "moco", "supcon")
MULTI_CROP_METHODS = ("simclr", "moco", "supcon")  # extra low-resolution crops
DECOUPLED_METHODS = ("simclr", "moco")  # the decoupled and the debiased denominators
# Temperatures for small batches: PCL, SupCon and NNCLR follow the papers' CIFAR runs;
# SimCLR's and MoCo's were measured on Fashion-MNIST (kNN top-1: SimCLR 82.0 at 0.1 vs 81.4
# at 0.2 and 78.1 at 0.05; symmetric MoCo 81.9 at 0.1 vs 81.6 at 0.2).
DEFAULT_TEMPERATURE = {"simclr": 0.1, "moco": 0.1, "nnclr": 0.1, "pcl": 0.2, "supcon": 0.1,
                       "dense": 0.2}  # DenseCL's and PixPro's (0.2 / 0.3)
# MoCo v1's linear head: at 15 minutes on Fashion-MNIST symmetric MoCo scored 84.8 / 86.9
# (cosine / L2 kNN) with it against 84.2 / 87.1 with v2's MLP head.
DEFAULT_HEAD = {"simclr": "mlp", "moco": "linear", "nnclr": "mlp", "pcl": "mlp", "supcon": "mlp",
                "dense": "mlp"}


class PooledTrunk(nn.Module):
    """trunk → global average pool → [n, C]."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))


class Method(nn.Module):
    """Base: ``forward(x1, x2, labels, index, small)`` → scalar loss. ``small`` holds
    extra low-resolution crops [v·n, C, s, s] (view-major; SimCLR, SupCon and MoCo only),
    which go through the trunk in their own pass."""

    needs_labels = False

    def __init__(self, trunk: nn.Module, channels: int):
        super().__init__()
        self.encoder = PooledTrunk(trunk)
        self.channels = channels

    @property
    def trunk(self) -> nn.Module:
        return self.encoder.trunk


HEADS = ("mlp", "linear", "none")


def _projector(head: str, channels: int, hidden_dim: int, out_dim: int, **mlp_kw):
    """The projection head and its output dim: the method's MLP, one Linear layer
    (MoCo v1), or none (the loss sees the pooled trunk features, the ones kNN and the
    detector use)."""
    if head == "none":
        return nn.Identity(), channels
    if head == "linear":
        return nn.Linear(channels, out_dim), out_dim
    if head == "mlp":
        return ProjectionHead(channels, hidden_dim, out_dim, **mlp_kw), out_dim
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def _views(z: torch.Tensor, z_small: torch.Tensor | None, n: int) -> torch.Tensor:
    """[2n, D] (views 1 and 2) and optional [v·n, D] extra crops → [n, 2 + v, D]."""
    views = z if z_small is None else torch.cat([z, z_small])
    return views.view(-1, n, z.shape[1]).transpose(0, 1)


def _no_small(method: Method, small) -> None:
    if small is not None:
        raise ValueError(f"{type(method).__name__} does not take multi-crop views")


class SimCLR(Method):
    def __init__(
        self, trunk, channels, *, temperature, hidden_dim, out_dim, head="mlp",
        gather_distributed=False, decoupled=False, debiased=0.0, **_,
    ):
        super().__init__(trunk, channels)
        self.projector, _ = _projector(head, channels, hidden_dim, out_dim)
        self.loss = NTXentLoss(
            temperature, gather_distributed=gather_distributed, decoupled=decoupled,
            debiased=debiased,
        )
        self._multi_positive = SupConLoss(temperature, gather_distributed=gather_distributed)

    def forward(self, x1, x2, labels=None, index=None, small=None):
        n = x1.shape[0]
        z = self.projector(self.encoder(torch.cat([x1, x2])))  # one pass: shared BN stats
        if small is None:
            return self.loss(z[:n], z[n:])
        if self.loss.decoupled or self.loss.debiased:
            raise ValueError("SimCLR's multi-crop loss has no decoupled or debiased form")
        # Multi-crop: every crop of an image is a positive of every other (NT-Xent with
        # several positives, i.e. SupCon with each image its own class).
        return self._multi_positive(_views(z, self.projector(self.encoder(small)), n), None)


class SupCon(Method):
    needs_labels = True

    def __init__(
        self, trunk, channels, *, temperature, hidden_dim, out_dim, head="mlp",
        gather_distributed=False, **_,
    ):
        super().__init__(trunk, channels)
        self.projector, _ = _projector(head, channels, hidden_dim, out_dim)
        self.loss = SupConLoss(temperature, gather_distributed=gather_distributed)

    def forward(self, x1, x2, labels=None, index=None, small=None):
        n = x1.shape[0]
        z = self.projector(self.encoder(torch.cat([x1, x2])))
        zs = None if small is None else self.projector(self.encoder(small))
        return self.loss(_views(z, zs, n), labels)


class MoCoMethod(Method):
    def __init__(
        self, trunk, channels, *, temperature, hidden_dim, out_dim, queue_size, momentum,
        head="mlp", gather_distributed=False, decoupled=False, debiased=0.0,
        predictor=False, batch_negatives=False, symmetric=False, **_,
    ):
        super().__init__(trunk, channels)
        projector, dim = _projector(head, channels, hidden_dim, out_dim)
        self.moco = MoCo(
            nn.Sequential(self.encoder, projector),
            dim,
            queue_size=queue_size,
            momentum=momentum,
            temperature=temperature,
            shuffle_bn_splits=2,
            # v1/v2's one-way loss: at 15 CPU minutes it gets 1.6× the steps of the
            # symmetrised one and scores higher (README).
            symmetric=symmetric,
            gather_distributed=gather_distributed,  # every process enqueues all keys
            decoupled=decoupled,
            debiased=debiased,
            predictor=PredictionHead(dim, hidden_dim) if predictor else None,  # MoCo v3
            batch_negatives=batch_negatives,
        )

    def forward(self, x1, x2, labels=None, index=None, small=None):
        return self.moco(x1, x2, small)


class NNCLR(Method):
    def __init__(
        self, trunk, channels, *, temperature, hidden_dim, out_dim, queue_size, head="mlp", **_
    ):
        super().__init__(trunk, channels)
        self.projector, dim = _projector(
            head, channels, hidden_dim, out_dim, num_layers=3, last_batch_norm=True
        )
        self.predictor = PredictionHead(dim, hidden_dim)
        self.loss = NNCLRLoss(temperature, queue_size=queue_size)

    def forward(self, x1, x2, labels=None, index=None, small=None):
        _no_small(self, small)
        n = x1.shape[0]
        z = self.projector(self.encoder(torch.cat([x1, x2])))
        p = self.predictor(z)
        return self.loss(z[:n], z[n:], p[:n], p[n:])


class PCL(Method):
    """MoCo-style instance term (momentum keys, a queue of negatives) plus ProtoNCE
    prototypes re-clustered from the memory of momentum features every
    ``recluster_steps`` steps (PCL: every epoch), the first time after one such period
    of instance-only warm-up."""

    def __init__(
        self,
        trunk,
        channels,
        *,
        temperature,
        hidden_dim,
        out_dim,
        queue_size,
        momentum,
        num_samples,
        num_clusters,
        recluster_steps,
        head="mlp",
        **_,
    ):
        super().__init__(trunk, channels)
        self.projector, dim = _projector(head, channels, hidden_dim, out_dim)
        self.key_encoder = copy.deepcopy(nn.Sequential(self.encoder, self.projector))
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.m = momentum
        self.queue = FeatureQueue(queue_size, dim, random_init=True)
        self.loss = ProtoNCELoss(
            temperature,
            tuple(min(k, num_samples) for k in num_clusters),
            memory_size=num_samples,
        )
        self.recluster_steps = recluster_steps
        self.steps = 0

    def forward(self, x1, x2, labels=None, index=None, small=None):
        _no_small(self, small)
        if self.training:
            if self.steps and self.steps % self.recluster_steps == 0:
                self.loss.update_prototypes(seed=self.steps)
            self.steps += 1
        q = self.projector(self.encoder(x1))
        with torch.no_grad():
            momentum_update(self.key_encoder, nn.Sequential(self.encoder, self.projector), self.m)
            k = F.normalize(self.key_encoder(x2), dim=1)
        loss = self.loss(q, k, self.queue.get().clone(), index)
        self.queue.enqueue(k)
        return loss


_CLASSES = {"simclr": SimCLR, "moco": MoCoMethod, "nnclr": NNCLR, "pcl": PCL, "supcon": SupCon}


def build_method(name: str, trunk: nn.Module, channels: int, **kwargs) -> Method:
    """Build one of :data:`METHODS` around ``trunk`` (keyword hyperparameters per method;
    ``head`` defaults to :data:`DEFAULT_HEAD`; ``gather_distributed=True`` makes SimCLR's,
    SupCon's and MoCo's losses use the features of every process)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    if kwargs.get("head") is None:
        kwargs["head"] = DEFAULT_HEAD[name]
    return _CLASSES[name](trunk, channels, **kwargs)


class DenseContrast(nn.Module):
    """Dense contrast over the maps of a detection backbone, plus SimCLR's global term.

    ``features`` maps images [n, 3, S, S] to ``(last, maps)``: the trunk's last feature map
    [n, C, h, w] and a list of dense maps [n, D_l, h_l, w_l] (a feature pyramid's levels,
    or the trunk's last map itself). Each dense map is average-pooled to at most
    ``grid``×``grid`` cells, projected by a two-layer 1×1-conv head (DenseCL's; one head
    shared by levels of equal width, as a detector's heads are shared over pyramid
    levels) and scored with :class:`~ore.contrastive.dense.DenseInfoNCELoss`, the cells
    matched by the two crops' boxes:

        L = (1 − λ)·NT-Xent(g(pool(last₁)), g(pool(last₂))) + λ·(1/L) Σ_l L_dense(level l)

    with λ = ``dense_weight`` (DenseCL: 0.5; 1 leaves the global term and its head out).

    ``forward(x1, x2, boxes1, boxes2)`` → scalar loss; ``boxes`` as
    :class:`~ore.contrastive.augment.BatchAugment` returns them.
    """

    def __init__(self, features: nn.Module, channels: int, dense_channels: list[int], *,
                 temperature: float, hidden_dim: int, out_dim: int, dense_weight: float = 0.5,
                 grid: int = 7, head: str = "mlp", gather_distributed: bool = False, **_):
        super().__init__()
        if not 0 < dense_weight <= 1:
            raise ValueError(f"dense_weight must be in (0, 1], got {dense_weight}")
        if grid < 1:
            raise ValueError(f"grid must be ≥ 1, got {grid}")
        if gather_distributed:
            raise ValueError("DenseContrast runs in one process only")
        if head != "mlp":
            raise ValueError(f"DenseContrast has 1×1-conv MLP heads only, not {head!r}")
        self.features = features
        self.dense_weight, self.grid = float(dense_weight), int(grid)
        self.projector = (ProjectionHead(channels, hidden_dim, out_dim)
                          if dense_weight < 1 else None)
        self.global_loss = NTXentLoss(temperature)
        self.dense_loss = DenseInfoNCELoss(temperature)

        def conv_head(d):
            return nn.Sequential(nn.Conv2d(d, hidden_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden_dim, out_dim, 1))

        shared = len(set(dense_channels)) == 1
        heads = [conv_head(dense_channels[0])] if shared else [conv_head(d) for d in
                                                               dense_channels]
        self.dense_heads = nn.ModuleList(heads)
        self.num_levels = len(dense_channels)

    def forward(self, x1, x2, boxes1, boxes2):
        n = x1.shape[0]
        last, maps = self.features(torch.cat([x1, x2]))  # one pass: shared BN statistics
        if len(maps) != self.num_levels:
            raise ValueError(f"features gave {len(maps)} dense maps, expected "
                             f"{self.num_levels}")
        dense = []
        for level, m in enumerate(maps):
            h, w = m.shape[-2:]
            if h > self.grid or w > self.grid:
                m = F.adaptive_avg_pool2d(m, (min(h, self.grid), min(w, self.grid)))
            z = self.dense_heads[level % len(self.dense_heads)](m)  # [2n, out_dim, g, g]
            dense.append(self.dense_loss(z[:n], z[n:], boxes1, boxes2))
        loss = torch.stack(dense).mean() * self.dense_weight
        if self.projector is not None:
            g = self.projector(last.mean(dim=(2, 3)))  # [2n, out_dim]
            loss = loss + (1 - self.dense_weight) * self.global_loss(g[:n], g[n:])
        return loss
