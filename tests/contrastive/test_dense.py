"""The dense contrastive loss against a naive loop over cells written from its formula,
analytic values, the crop boxes of the augmentation, fp64 gradcheck, and stability at
temperature 0.01."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ore.contrastive.augment import BatchAugment
from ore.contrastive.dense import DenseInfoNCELoss, match_cells
from ore.contrastive.methods import DenseContrast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def naive_dense(z1, z2, boxes1, boxes2, t):
    """One cell at a time: its centre in the image, the other view's cell there, and the
    cross-entropy over every other cell of the batch."""
    n, _, h, w = z1.shape
    views = (z1, z2)
    boxes = (boxes1, boxes2)
    cells = [(v, b, i, j) for v in range(2) for b in range(n) for i in range(h) for j in range(w)]

    def feat(v, b, i, j):
        return views[v][b, :, i, j]

    def cos(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    total, count = 0.0, 0
    for v, b, i, j in cells:
        left, top, right, bottom = (float(x) for x in boxes[v][b])
        x = left + (j + 0.5) / w * (right - left)
        y = top + (i + 0.5) / h * (bottom - top)
        oleft, otop, oright, obottom = (float(x) for x in boxes[1 - v][b])
        u, s = (x - oleft) / (oright - oleft), (y - otop) / (obottom - otop)
        if not (0 <= u < 1 and 0 <= s < 1):
            continue
        pos = (1 - v, b, min(int(math.floor(s * h)), h - 1), min(int(math.floor(u * w)), w - 1))
        a = feat(v, b, i, j)
        den = sum(math.exp(cos(a, feat(*k)) / t) for k in cells if k != (v, b, i, j))
        total += -math.log(math.exp(cos(a, feat(*pos)) / t) / den)
        count += 1
    return total / count


def random_boxes(n, flip=True):
    """Crops of area 0.3–0.8 of the image, flipped at random."""
    wh = torch.empty(n, 2).uniform_(0.55, 0.9)
    lo = torch.rand(n, 2) * (1 - wh)
    b = torch.cat([lo, lo + wh], 1)
    if flip:
        f = torch.rand(n) < 0.5
        b[f] = b[f][:, [2, 1, 0, 3]]
    return b


def test_match_cells_analytic_with_and_without_flip():
    # View 1 the whole image, view 2 its right half: of view 1's 4 columns, centres 0.625
    # and 0.875 fall in view 2, at its fractions 0.25 and 0.75 (columns 1 and 3).
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    right = torch.tensor([[0.5, 0.0, 1.0, 1.0]])
    idx, ok = match_cells(whole, right, 1, 4)
    assert ok.tolist() == [[False, False, True, True]]
    assert idx[ok].tolist() == [1, 3]
    flipped = torch.tensor([[1.0, 0.0, 0.5, 1.0]])  # the same half, mirrored
    idx, ok = match_cells(whole, flipped, 1, 4)
    assert ok.tolist() == [[False, False, True, True]] and idx[ok].tolist() == [3, 1]
    # The way back: view 2's column j at image x = 0.5 + (j + 0.5)/8, view 1's column ⌊4x⌋.
    idx, ok = match_cells(right, whole, 2, 4)
    assert ok.all() and idx[0].tolist() == [2, 2, 3, 3, 6, 6, 7, 7]
    disjoint = torch.tensor([[0.0, 0.0, 0.4, 1.0]])
    assert not match_cells(disjoint, right, 3, 3)[1].any()


@pytest.mark.parametrize("shape", [(3, 8, 4, 4), (2, 5, 3, 5)])
def test_dense_matches_loop(shape):
    n, d, h, w = shape
    z1, z2 = torch.randn(shape), torch.randn(shape)
    b1, b2 = random_boxes(n), random_boxes(n)
    for t in (0.5, 0.1):
        got = DenseInfoNCELoss(t)(z1, z2, b1, b2)
        want = naive_dense(z1.double(), z2.double(), b1.double(), b2.double(), t)
        assert math.isclose(float(got), want, rel_tol=1e-5, abs_tol=1e-5)


def test_dense_equal_similarities_give_log_of_keys():
    n, h, w = 3, 4, 4
    z = torch.ones(n, 6, h, w)
    b1, b2 = random_boxes(n), random_boxes(n)
    got = DenseInfoNCELoss(0.3)(z, z.clone(), b1, b2)
    assert math.isclose(float(got), math.log(2 * n * h * w - 1), rel_tol=1e-6)


def test_dense_identical_views_with_orthogonal_cells():
    # Same crop twice: every cell is an anchor, its positive the same cell of the other
    # view; one-hot features per location give sim 1 to the positive and 0 to the M − 2
    # other keys: ℓ = log(1 + (M − 2)·e^{−1/τ}).
    n, h, w, t = 2, 3, 3, 0.5
    m = 2 * n * h * w
    z = torch.eye(n * h * w).view(n, h, w, n * h * w).permute(0, 3, 1, 2)
    boxes = torch.tensor([[0.1, 0.2, 0.9, 0.8], [0.7, 0.0, 0.2, 0.6]])
    got = DenseInfoNCELoss(t)(z, z.clone(), boxes, boxes.clone())
    assert math.isclose(float(got), math.log(1 + (m - 2) * math.exp(-1 / t)), rel_tol=1e-6)


def test_dense_without_overlap_is_zero_with_graph():
    z1 = torch.randn(2, 4, 3, 3, requires_grad=True)
    left = torch.tensor([[0.0, 0.0, 0.4, 1.0]]).repeat(2, 1)
    right = torch.tensor([[0.6, 0.0, 1.0, 1.0]]).repeat(2, 1)
    loss = DenseInfoNCELoss(0.2)(z1, torch.randn(2, 4, 3, 3), left, right)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(z1.grad, torch.zeros_like(z1))


def test_dense_gradcheck_fp64():
    z1 = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b1, b2 = random_boxes(2).double(), random_boxes(2).double()
    loss = DenseInfoNCELoss(0.2)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, b1, b2), (z1, z2), eps=1e-6,
                                    atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_dense_finite_and_exact_at_temperature_001(bf16):
    z1 = torch.randn(4, 32, 5, 5)
    z2 = (z1 + 0.01 * torch.randn_like(z1)).requires_grad_()
    b1, b2 = random_boxes(4), random_boxes(4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = DenseInfoNCELoss(0.01)(z1.bfloat16() if bf16 else z1, z2, b1, b2)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(z2.grad).all()
    if not bf16:
        want = DenseInfoNCELoss(0.01)(z1.double(), z2.double(), b1.double(), b2.double())
        assert math.isclose(float(loss.detach()), float(want.detach()), rel_tol=1e-4)


def test_dense_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="temperature"):
        DenseInfoNCELoss(0.0)
    with pytest.raises(ValueError, match="boxes"):
        DenseInfoNCELoss()(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2),
                           torch.rand(3, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="z1 and z2"):
        DenseInfoNCELoss()(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 3),
                           torch.rand(2, 4), torch.rand(2, 4))


def test_augment_boxes_locate_the_view_in_the_image():
    # A view's pixel at fraction (u, v) must show the image at the box's point for it,
    # flipped or not: compare each view with the image resampled at those points.
    img = torch.rand(6, 3, 40, 40)
    aug = BatchAugment(16, scale=(0.2, 0.6), flip_prob=0.5, jitter_prob=0, gray_prob=0)
    views, boxes = aug(img, return_boxes=True)
    assert boxes.shape == (6, 4)
    assert (boxes[:, 0] > boxes[:, 2]).any() and (boxes[:, 0] < boxes[:, 2]).any()
    frac = (torch.arange(16) + 0.5) / 16
    x = boxes[:, 0:1] + frac * (boxes[:, 2:3] - boxes[:, 0:1])  # [6, 16] image fractions
    y = boxes[:, 1:2] + frac * (boxes[:, 3:4] - boxes[:, 1:2])
    grid = torch.stack([x[:, None, :].expand(-1, 16, -1), y[:, :, None].expand(-1, -1, 16)], -1)
    want = F.grid_sample(img, grid * 2 - 1, mode="bilinear", padding_mode="border",
                         align_corners=False)
    assert torch.allclose(views, want, atol=1e-4)
    assert isinstance(aug(img), torch.Tensor)  # without return_boxes: the views alone


def test_dense_contrast_trains_on_pooled_maps_of_every_level():
    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.up = torch.nn.Conv2d(8, 6, 1)

        def forward(self, x):
            a = self.conv(x)  # [2n, 8, 16, 16]
            return a, [self.up(a), self.up(a)[..., ::4, ::4]]  # 16×16 pooled to 7×7, 4×4

    feats = Features()
    m = DenseContrast(feats, 8, [6, 6], temperature=0.2, hidden_dim=16, out_dim=8,
                      dense_weight=0.5, grid=7)
    assert len(m.dense_heads) == 1  # one head shared by levels of equal width
    x1, x2 = torch.rand(2, 4, 3, 32, 32).unbind(0)
    b1, b2 = random_boxes(4), random_boxes(4)
    loss = m(x1, x2, b1, b2)
    # The same value from its parts: the global NT-Xent and each level's dense loss.
    from ore.contrastive.ntxent import NTXentLoss

    last, maps = feats(torch.cat([x1, x2]))
    g = m.projector(last.mean(dim=(2, 3)))
    z0 = m.dense_heads[0](F.adaptive_avg_pool2d(maps[0], 7))
    z1 = m.dense_heads[0](maps[1])
    dense = DenseInfoNCELoss(0.2)
    want = 0.5 * NTXentLoss(0.2)(g[:4], g[4:]) + 0.5 * 0.5 * (
        dense(z0[:4], z0[4:], b1, b2) + dense(z1[:4], z1[4:], b1, b2))
    assert torch.allclose(loss, want, atol=1e-6)
    loss.backward()
    assert feats.conv.weight.grad.abs().sum() > 0
    only_dense = DenseContrast(feats, 8, [6, 8], temperature=0.2, hidden_dim=16, out_dim=8,
                               dense_weight=1.0)
    assert only_dense.projector is None and len(only_dense.dense_heads) == 2
    with pytest.raises(ValueError, match="dense_weight"):
        DenseContrast(feats, 8, [6], temperature=0.2, hidden_dim=16, out_dim=8,
                      dense_weight=0)
