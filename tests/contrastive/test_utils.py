"""Momentum update, feature queue, k-means, augmentations, kNN monitor, heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive import (
    BatchAugment,
    FeatureQueue,
    PredictionHead,
    ProjectionHead,
    kmeans,
    knn_accuracy,
    knn_predict,
    momentum_update,
    nearest_neighbour,
)


def test_momentum_update_formula_and_buffers_untouched():
    torch.manual_seed(0)
    src, tgt = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4)
    )
    tgt[1].running_mean.fill_(7.0)
    before = [p.clone() for p in tgt.parameters()]
    momentum_update(tgt, src, 0.9)
    for b, t, s in zip(before, tgt.parameters(), src.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    assert torch.all(tgt[1].running_mean == 7.0)
    momentum_update(tgt, src, 0.0)  # m = 0 copies the source
    assert all(torch.equal(t, s) for t, s in zip(tgt.parameters(), src.parameters()))
    with pytest.raises(ValueError):
        momentum_update(tgt, src, -0.1)


def test_queue_wraps_around_fifo():
    q = FeatureQueue(5, dim=1)
    assert q.get().shape == (0, 1)
    q.enqueue(torch.arange(3.0)[:, None])  # rows 0..2
    q.enqueue(torch.arange(3.0, 7.0)[:, None])  # 3, 4 fill; 5, 6 overwrite rows 0, 1
    assert q.features[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert int(q.ptr) == 2 and int(q.num_filled) == 5
    q.enqueue(torch.arange(10.0, 22.0)[:, None])  # larger than K: only the newest 5 stay
    assert sorted(q.get()[:, 0].tolist()) == [17, 18, 19, 20, 21]
    with pytest.raises(ValueError):
        q.enqueue(torch.zeros(2, 3))


def test_queue_lazy_allocation_and_state_dict_roundtrip():
    q = FeatureQueue(4)
    q.enqueue(torch.randn(3, 6))
    fresh = FeatureQueue(4)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.get(), q.get()) and int(fresh.ptr) == 3


def test_random_init_queue_is_full_of_unit_vectors():
    q = FeatureQueue(8, dim=4, random_init=True)
    assert q.get().shape == (8, 4)
    assert torch.allclose(q.get().norm(dim=1), torch.ones(8), atol=1e-5)


def test_nearest_neighbour_is_cosine_argmax():
    support = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    z = torch.tensor([[3.0, 0.1], [0.1, 0.2], [-2.0, -0.5]])
    assert torch.equal(nearest_neighbour(z, support), support[[0, 1, 2]])


def _blobs(num_clusters, per, dim, gen):
    centres = torch.randn(num_clusters, dim, generator=gen) * 10
    noise = 0.1 * torch.randn(num_clusters * per, dim, generator=gen)
    x = centres.repeat_interleave(per, 0) + noise
    return x, torch.arange(num_clusters).repeat_interleave(per)


def _same_partition(a, b):
    # Two labelings agree up to renaming iff the pair (a, b) has as many values as a and b.
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    x, truth = _blobs(6, 40, 5, gen)
    perm = torch.randperm(len(x), generator=gen)
    c, a = kmeans(x[perm], 6, seed=1)
    assert c.shape == (6, 5) and a.shape == (240,)
    assert _same_partition(a, truth[perm])


def test_kmeans_batched_and_spherical():
    gen = torch.Generator().manual_seed(1)
    xs, truths = zip(*[_blobs(4, 25, 3, gen) for _ in range(3)])
    c, a = kmeans(torch.stack(xs), 4, seed=0, chunk=17)  # chunk < n exercises blocking
    assert c.shape == (3, 4, 3) and a.shape == (3, 100)
    for b in range(3):
        assert _same_partition(a[b], truths[b])
    # Spherical: directions matter, not norms.
    dirs = torch.eye(3)
    x = dirs.repeat_interleave(20, 0) * (1 + 4 * torch.rand(60, 1, generator=gen))
    x = x + 0.01 * torch.randn(60, 3, generator=gen)
    c, a = kmeans(x, 3, spherical=True)
    assert _same_partition(a, torch.arange(3).repeat_interleave(20))
    assert torch.allclose(c.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError):
        kmeans(x, 61)


def test_batch_augment_shapes_range_and_randomness():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 28, 28)
    aug = BatchAugment(32, blur_prob=0.5)
    y1, y2 = aug(x), aug(x)
    assert y1.shape == (16, 3, 32, 32)
    assert y1.min() >= 0 and y1.max() <= 1
    assert not torch.allclose(y1, y2)
    # With every random part switched off and a full-image crop it is a resize.
    ident = BatchAugment(28, scale=(1, 1), ratio=(1, 1), flip_prob=0, jitter_prob=0, gray_prob=0)
    assert torch.allclose(ident(x), x, atol=1e-5)
    gray = BatchAugment(28, scale=(1, 1), ratio=(1, 1), flip_prob=0, jitter_prob=0, gray_prob=1)
    g = gray(x)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    flip = BatchAugment(28, scale=(1, 1), ratio=(1, 1), flip_prob=1, jitter_prob=0, gray_prob=0)
    assert torch.allclose(flip(x), x.flip(-1), atol=1e-5)
    sol = BatchAugment(28, scale=(1, 1), ratio=(1, 1), flip_prob=0, jitter_prob=0, gray_prob=0,
                       solarize_prob=1)
    expected = x.clone()
    expected[x >= 0.5] = 1 - x[x >= 0.5]  # solarisation written out element by element
    assert torch.allclose(sol(x), expected, atol=1e-5)
    with pytest.raises(ValueError):
        BatchAugment(32, gray_prob=2)
    with pytest.raises(ValueError, match="solarize_prob"):
        BatchAugment(32, solarize_prob=-0.1)


def test_batch_augment_crop_matches_affine_grid():
    # The separable crop-and-flip resampling must give what affine_grid + grid_sample give
    # with the same matrices (drawn from the same random stream).
    x = torch.rand(6, 1, 28, 28)
    aug = BatchAugment(20, scale=(0.3, 1), flip_prob=0.5)
    torch.manual_seed(3)
    got = aug._crop_flip(x)
    torch.manual_seed(3)
    B = x.shape[0]
    area = torch.empty(B).uniform_(0.3, 1)
    r = torch.empty(B).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    w, h = (area * r).sqrt().clamp(max=1), (area / r).sqrt().clamp(max=1)
    cx, cy = (torch.rand(B) * 2 - 1) * (1 - w), (torch.rand(B) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [B, 1, 20, 20], align_corners=False)
    want = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)
    assert (flip < 0).any() and (flip > 0).any()
    assert torch.allclose(got, want, atol=1e-5)


def test_knn_cosine_and_l2():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(q, bank, labels, num_classes=2, k=2).tolist() == [0, 1]
    assert knn_predict(q, bank, labels, num_classes=2, k=1, metric="l2").tolist() == [0, 1]
    # L2 uses magnitudes: [0, 2] is far from [0.05, 1.0] but close to [0, 2.1]
    far = torch.tensor([[0.0, 2.1]])
    only = knn_predict(far, bank, torch.tensor([0, 0, 0, 0, 1]), num_classes=2, k=1, metric="l2")
    assert only.tolist() == [1]
    acc = knn_accuracy(bank, labels, q, torch.tensor([0, 1]), k=3)
    assert acc == 1.0
    with pytest.raises(ValueError):
        knn_predict(q, bank, labels, num_classes=2, metric="manhattan")


def test_heads_shapes():
    assert ProjectionHead(16, 32, 8)(torch.randn(4, 16)).shape == (4, 8)
    assert ProjectionHead(16, 32, 8, num_layers=3, last_batch_norm=True)(
        torch.randn(4, 16)
    ).shape == (4, 8)
    assert PredictionHead(8, 16)(torch.randn(4, 8)).shape == (4, 8)
    with pytest.raises(ValueError):
        ProjectionHead(16, 32, 8, num_layers=0)
