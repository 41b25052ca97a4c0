"""MoCo (He et al., CVPR 2020; v2: Chen et al., 2020): momentum key encoder and a queue."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive._checks import check_denominator, check_temperature
from ore.contrastive.distributed import all_gather_no_grad
from ore.contrastive.infonce import info_nce
from ore.contrastive.memory import FeatureQueue, momentum_update


class MoCo(nn.Module):
    """Momentum contrast: a query encoder f_q, its momentum copy f_k, and a queue of keys.

        θ_k ← m·θ_k + (1 − m)·θ_q                        (before each key forward)
        L = −log( exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_{j=1}^{K} exp(q·k_j/τ)) )

    with q = f_q(x_q), k⁺ = f_k(x_k) unit-normalised and k_j the queued keys of earlier
    batches; the keys of this batch are enqueued afterwards. f_k gets no gradient.

    Single-process BatchNorm lets a query find its key through batch statistics (the
    reason for MoCo's shuffling BN across GPUs). ``shuffle_bn_splits = s > 1`` emulates it
    on one device: keys are encoded in s shuffled sub-batches.

    ``symmetric=True`` makes each view once the query and once the key (MoCo v3's
    symmetrised loss, here with the queue): the loss is the mean over the 2n queries
    [x_q; x_k] against the keys [x_k; x_q], all scored against the same queue, and
    the 2n keys are enqueued afterwards. Two asymmetric calls would not do: the first
    enqueues f_k(x_k), which the second then scores as a negative of its query f_q(x_k),
    the same image under the same augmentation.

    ``x_extra`` adds query-only crops (SwAV's multi-crop: small low-resolution views).
    Each is scored against every key of its image, and only the two views' keys are
    enqueued; the loss is the mean over all (query, key) pairs.

    ``predictor`` (MoCo v3) is an MLP applied to the queries only, q = p(f_q(x_q)): the
    key encoder has no copy of it, so the queries must predict the momentum keys rather
    than equal them.

    ``batch_negatives=True`` adds this batch's keys of the other images to each query's
    negatives (fresh keys, beside the queue's older ones); the keys of the query's own
    image, its positive and, when symmetric, the key of its own view, are left out.

    ``decoupled=True`` drops the positive from each denominator (DCL); ``debiased=τ⁺``
    removes the estimated same-class share of the queue (Chuang et al., 2020); see
    :func:`~ore.contrastive.infonce.info_nce`.

    Attributes:
        encoder_q: f_q, mapping images to [n, dim] (trunk + projection head).
        encoder_k: f_k, a deep copy of f_q updated only by momentum.
        predictor: the query-side MLP, or None.
        queue: :class:`FeatureQueue` of K keys, starting from random unit vectors.
        K, m, T: queue size, momentum, temperature (names from the paper).

    Examples:
        >>> enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
        >>> moco = MoCo(enc, 16, queue_size=64)
        >>> loss = moco(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    """

    def __init__(
        self,
        encoder_q: nn.Module,
        dim: int,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.07,
        *,
        shuffle_bn_splits: int = 1,
        symmetric: bool = False,
        gather_distributed: bool = False,
        decoupled: bool = False,
        debiased: float = 0.0,
        predictor: nn.Module | None = None,
        batch_negatives: bool = False,
    ):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if shuffle_bn_splits < 1:
            raise ValueError(f"shuffle_bn_splits must be ≥ 1, got {shuffle_bn_splits}")
        self.K, self.m = int(queue_size), float(momentum)
        self.T = check_temperature(temperature)
        self.shuffle_bn_splits = shuffle_bn_splits
        self.symmetric = bool(symmetric)
        self.gather_distributed = gather_distributed
        self.decoupled, self.debiased = check_denominator(decoupled, debiased)
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        self.predictor = predictor
        self.batch_negatives = bool(batch_negatives)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.queue = FeatureQueue(self.K, dim, random_init=True)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.encoder_q(x)
        return F.normalize(q if self.predictor is None else self.predictor(q), dim=1)

    @torch.no_grad()
    def _keys(self, x_k: torch.Tensor) -> torch.Tensor:
        # At least two keys per sub-batch: BatchNorm cannot normalise a single sample.
        s = max(1, min(self.shuffle_bn_splits, x_k.shape[0] // 2))
        if s == 1:
            return F.normalize(self.encoder_k(x_k), dim=1)
        perm = torch.randperm(x_k.shape[0], device=x_k.device)
        k = torch.cat([self.encoder_k(chunk) for chunk in x_k[perm].chunk(s)])
        return F.normalize(k[torch.argsort(perm)], dim=1)

    def forward(
        self, x_q: torch.Tensor, x_k: torch.Tensor, x_extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_q, x_k: two augmented views [n, ...]; x_extra: optional extra query crops
        [v·n, ...] (view-major, e.g. small multi-crop views), each scored against every
        key of its image. Returns the scalar loss."""
        n = x_q.shape[0]
        if self.symmetric:
            x_q, x_k = torch.cat([x_q, x_k]), torch.cat([x_k, x_q])
        q = self._queries(x_q)  # [n, dim] (2n when symmetric)
        if self.training:
            momentum_update(self.encoder_k, self.encoder_q, self.m)
        k = self._keys(x_k)  # no gradient
        q_all, k_all = q, k
        if x_extra is not None:
            if x_extra.shape[0] % n:
                raise ValueError(
                    f"x_extra must hold whole views of the {n} images, got {x_extra.shape[0]}"
                )
            v, (nk, d) = x_extra.shape[0] // n, (k.shape[0] // n, k.shape[1])
            q_extra = self._queries(x_extra)  # own pass: own BN stats
            # Row (j, u, i): extra view u of image i against image i's key of view j.
            q_all = torch.cat([q, q_extra.repeat(nk, 1)])
            k_all = torch.cat([k, k.view(nk, 1, n, d).expand(nk, v, n, d).reshape(-1, d)])
        negatives = self.queue.get().clone()  # [K, dim]; enqueue below writes in place
        exclude = None
        if self.batch_negatives:
            # Rows of q_all and of k are view-major blocks of the n images: row r shows
            # image r mod n. A query's negatives are the keys of the other images.
            img_q = torch.arange(q_all.shape[0], device=q.device) % n
            img_k = torch.arange(k.shape[0], device=q.device) % n
            exclude = F.pad(img_q[:, None] == img_k[None, :], (0, negatives.shape[0]))
            negatives = torch.cat([k, negatives])
        with torch.autocast(device_type=q.device.type, enabled=False):
            loss = info_nce(q_all.float(), k_all.float(), negatives.float(), self.T,
                            decoupled=self.decoupled, debiased=self.debiased,
                            exclude=exclude).mean()
        if self.training:
            self.queue.enqueue(all_gather_no_grad(k) if self.gather_distributed else k)
        return loss
