"""k-nearest-neighbour classification of embeddings: the standard SSL monitor.

Two protocols: ``cosine`` (unit-normalised features, the k most similar bank entries vote
with weight exp(sim/τ), Wu et al. 2018) and ``l2`` (Euclidean distance on the features as
they are, plain majority vote of the k nearest; ties go to the nearer neighbours).
Shapes: n = queries, S = bank size, d = dim, C = classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

METRICS = ("cosine", "l2")


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    metric: str = "cosine",
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels [n] for query [n, d] against bank [S, d] with labels [S]."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}], got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    query, bank = query.float(), bank.float()
    bank_labels = bank_labels.to(bank.device)
    if metric == "cosine":
        query, bank = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    else:
        bank_sq = (bank * bank).sum(1)
    preds = []
    for s in range(0, query.shape[0], chunk):
        q = query[s : s + chunk]
        if metric == "cosine":
            score = q @ bank.T  # [c, S]
        else:  # larger is nearer: −‖q − b‖² up to a per-row constant
            score = 2 * q @ bank.T - bank_sq[None]
        top, idx = score.topk(k, dim=1)  # [c, k], nearest first
        labels = bank_labels[idx]  # [c, k]
        if metric == "cosine":
            weight = (top / temperature).exp()
        else:  # one vote each, with a tiny bonus for rank to break ties toward nearer ones
            weight = 1.0 + 1e-3 * torch.linspace(1, 0, k, device=q.device).expand_as(top)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, labels, weight)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    **kwargs,
) -> float:
    """Top-1 accuracy (0..1) of :func:`knn_predict` on the test set."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(
        test_features, train_features, train_labels, num_classes=num_classes, **kwargs
    )
    return float((pred == test_labels.to(pred.device)).float().mean())


@torch.no_grad()
def embed(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    batch_size: int = 512,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply fn to images [n, ...] in batches (after ``transform``); returns [n, d] floats."""
    out = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s : s + batch_size]
        if transform is not None:
            x = transform(x)
        out.append(fn(x).float().flatten(1))
    return torch.cat(out)


class KNNMonitor:
    """kNN accuracy of an embedding on a labelled train (bank) / test split.

    Examples:
        >>> mon = KNNMonitor(train_x, train_y, test_x, test_y, transform=prep)
        >>> mon(lambda x: model(x))  # {"knn_cosine_top1": …, "knn_l2_top1": …}
    """

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batch_size: int = 512,
        cosine_k: int = 200,
        temperature: float = 0.1,
        l2_k: int = 5,
    ):
        self.train_images, self.train_labels = train_images, train_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.transform, self.batch_size = transform, batch_size
        self.cosine_k, self.temperature, self.l2_k = cosine_k, temperature, l2_k

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        bank = embed(fn, self.train_images, batch_size=self.batch_size, transform=self.transform)
        test = embed(fn, self.test_images, batch_size=self.batch_size, transform=self.transform)
        return {
            "knn_cosine_top1": knn_accuracy(
                bank, self.train_labels, test, self.test_labels,
                k=min(self.cosine_k, bank.shape[0]), temperature=self.temperature,
                metric="cosine",
            ),
            "knn_l2_top1": knn_accuracy(
                bank, self.train_labels, test, self.test_labels,
                k=min(self.l2_k, bank.shape[0]), metric="l2",
            ),
        }
