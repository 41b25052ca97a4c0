"""Each contrastive loss against a naive loop written from its formula, analytic values,
fp64 gradcheck, and finiteness at temperature 0.01 (fp32 and bf16 autocast)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ore.contrastive import (
    BilinearInfoNCELoss,
    CLIPLoss,
    InfoNCELoss,
    MaxMarginContrastiveLoss,
    MoCo,
    NNCLRLoss,
    NPairLoss,
    NTXentLoss,
    ProtoNCELoss,
    SupConLoss,
    TripletLoss,
)
from ore.contrastive.infonce import info_nce


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def close(a, b, tol=1e-5):
    a, b = (x.detach() if isinstance(x, torch.Tensor) else x for x in (a, b))
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)


def cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# ---------------------------------------------------------------- naive references
def naive_max_margin(x_i, x_j, same, margin):
    total = 0.0
    for a, b, s in zip(x_i, x_j, same):
        d2 = float(((a - b) ** 2).sum())
        total += d2 if s else max(0.0, margin - d2)
    return total / len(x_i)


def naive_triplet(a, p, n, margin):
    total = 0.0
    for ai, pi, ni in zip(a, p, n):
        total += max(0.0, float(((ai - pi) ** 2).sum() - ((ai - ni) ** 2).sum()) + margin)
    return total / len(a)


def naive_npair(a, p, negs):
    total = 0.0
    for i in range(len(a)):
        s = sum(math.exp(float(a[i] @ negs[i, m] - a[i] @ p[i])) for m in range(negs.shape[1]))
        total += math.log(1 + s)
    return total / len(a)


def naive_infonce(q, k, negs, t, decoupled=False):
    """decoupled: DCL, the positive left out of the denominator."""
    total = 0.0
    for i in range(len(q)):
        neg_i = negs if negs.ndim == 2 else negs[i]
        num = math.exp(cos(q[i], k[i]) / t)
        den = (0 if decoupled else num) + sum(math.exp(cos(q[i], n) / t) for n in neg_i)
        total += -math.log(num / den)
    return total / len(q)


def naive_debiased(pos_sim, neg_sims, t, tau_plus):
    """Chuang et al. (2020), eq. 5: one anchor's debiased loss from cosine similarities."""
    p = math.exp(pos_sim / t)
    m = len(neg_sims)
    g = max((sum(math.exp(s / t) for s in neg_sims) - tau_plus * m * p) / (1 - tau_plus),
            m * math.exp(-1 / t))
    return -math.log(p / (p + g))


def naive_debiased_infonce(q, k, negs, t, tau_plus):
    total = 0.0
    for i in range(len(q)):
        neg_i = negs if negs.ndim == 2 else negs[i]
        total += naive_debiased(cos(q[i], k[i]), [cos(q[i], n) for n in neg_i], t, tau_plus)
    return total / len(q)


def naive_debiased_ntxent(z1, z2, t, tau_plus):
    z = torch.cat([z1, z2])
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        negs = [cos(z[i], z[k]) for k in range(n2) if k not in (i, j)]
        total += naive_debiased(cos(z[i], z[j]), negs, t, tau_plus)
    return total / n2


def naive_ntxent(z1, z2, t, decoupled=False):
    z = torch.cat([z1, z2])
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        skip = (i, j) if decoupled else (i,)
        den = sum(math.exp(cos(z[i], z[k]) / t) for k in range(n2) if k not in skip)
        total += -math.log(math.exp(cos(z[i], z[j]) / t) / den)
    return total / n2


def naive_supcon(feats, labels, t):
    N, V, _ = feats.shape
    views = [(i, v) for v in range(V) for i in range(N)]
    total, count = 0.0, 0
    for i, vi in views:
        zi = feats[i, vi]
        others = [(j, vj) for j, vj in views if (j, vj) != (i, vi)]
        den = sum(math.exp(cos(zi, feats[j, vj]) / t) for j, vj in others)
        pos = [(j, vj) for j, vj in others if labels[j] == labels[i]]
        if not pos:
            continue
        s = sum(math.log(math.exp(cos(zi, feats[j, vj]) / t) / den) for j, vj in pos)
        total += -s / len(pos)
        count += 1
    return total / count


def naive_ce_rows(logits_fn, n):
    """mean over i of −log softmax_j(l_ij)[i] for a logit function l(i, j)."""
    total = 0.0
    for i in range(n):
        den = sum(math.exp(logits_fn(i, j)) for j in range(n))
        total += -math.log(math.exp(logits_fn(i, i)) / den)
    return total / n


# ---------------------------------------------------------------- against the loops
def test_max_margin_matches_loop_and_analytic():
    x_i, x_j = torch.randn(10, 4), torch.randn(10, 4) * 0.3
    same = torch.rand(10) > 0.5
    loss = MaxMarginContrastiveLoss(margin=2.0)(x_i, x_j, same)
    assert close(loss, naive_max_margin(x_i, x_j, same, 2.0))
    # Identical similar pairs cost nothing; identical dissimilar pairs cost the margin.
    x = torch.randn(6, 4)
    assert float(MaxMarginContrastiveLoss(1.5)(x, x, torch.ones(6, dtype=torch.bool))) == 0
    assert close(MaxMarginContrastiveLoss(1.5)(x, x, torch.zeros(6, dtype=torch.bool)), 1.5)


def test_triplet_matches_loop_and_analytic():
    a, p, n = torch.randn(3, 12, 5).unbind(0)
    assert close(TripletLoss(0.7)(a, p, n), naive_triplet(a, p, n, 0.7))
    # a = p and n far away: zero; a = p = n: exactly the margin.
    assert float(TripletLoss(1.0)(a, a, a + 10)) == 0
    assert close(TripletLoss(0.3)(a, a, a), 0.3)


def test_npair_matches_loop_and_analytic():
    a, p = torch.randn(6, 4), torch.randn(6, 4)
    negs = torch.randn(6, 5, 4)
    assert close(NPairLoss()(a, p, negs), naive_npair(a, p, negs))
    # All dot products zero → log(1 + M).
    zero = torch.zeros(6, 4)
    assert close(NPairLoss()(zero, zero, torch.zeros(6, 5, 4)), math.log(6))


@pytest.mark.parametrize("shared", [True, False])
def test_infonce_matches_loop(shared):
    q, k = torch.randn(7, 8), torch.randn(7, 8)
    negs = torch.randn(9, 8) if shared else torch.randn(7, 9, 8)
    loss = InfoNCELoss(temperature=0.2)(q, k, negs)
    assert close(loss, naive_infonce(q, k, negs, 0.2), 1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_decoupled_infonce_matches_loop(shared):
    q, k = torch.randn(7, 8), torch.randn(7, 8)
    negs = torch.randn(9, 8) if shared else torch.randn(7, 9, 8)
    loss = InfoNCELoss(temperature=0.2, decoupled=True)(q, k, negs)
    assert close(loss, naive_infonce(q, k, negs, 0.2, decoupled=True), 1e-4)
    assert float(loss) < float(InfoNCELoss(temperature=0.2)(q, k, negs))  # smaller denominator


def test_infonce_equal_similarities_give_log_of_keys():
    q = torch.ones(4, 3)
    assert close(InfoNCELoss(0.1)(q, q, torch.ones(9, 3)), math.log(10))


def test_ntxent_matches_loop():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert close(NTXentLoss(temperature=0.3)(z1, z2), naive_ntxent(z1, z2, 0.3), 1e-4)


def test_ntxent_equal_similarities():
    n = 5
    z = torch.ones(n, 8)
    assert close(NTXentLoss(0.5)(z, z), -math.log(1 / (2 * n - 1)))
    # DCL: the positive leaves the denominator, 2N − 2 equal terms remain.
    assert close(NTXentLoss(0.5, decoupled=True)(z, z), math.log(2 * n - 2))


def test_decoupled_ntxent_matches_loop():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    loss = NTXentLoss(temperature=0.3, decoupled=True)(z1, z2)
    assert close(loss, naive_ntxent(z1, z2, 0.3, decoupled=True), 1e-4)


def test_decoupled_ntxent_gradient_is_not_scaled_down_by_an_easy_positive():
    # NT-Xent's gradient on a negative carries the factor (1 − p_pos) (DCL's "coupling"):
    # with a near-certain positive it vanishes, while DCL's stays at the negatives' softmax.
    z1 = torch.eye(4, 6)
    z2 = (z1 + 0.3 * torch.eye(4, 6).roll(1, dims=1)).requires_grad_()
    grads = {}
    for decoupled in (False, True):
        z = z2.detach().clone().requires_grad_()
        NTXentLoss(0.05, decoupled=decoupled)(z1, z).backward()
        grads[decoupled] = z.grad.norm()
    assert float(grads[True]) > 10 * float(grads[False])


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("tau_plus", [0.05, 0.3])
def test_debiased_infonce_matches_loop(shared, tau_plus):
    q = torch.randn(7, 8)
    k = q + 0.5 * torch.randn(7, 8)  # near positives: some rows hit the floor at τ⁺ = 0.3
    negs = torch.randn(9, 8) if shared else torch.randn(7, 9, 8)
    loss = InfoNCELoss(temperature=0.5, debiased=tau_plus)(q, k, negs)
    assert close(loss, naive_debiased_infonce(q, k, negs, 0.5, tau_plus), 1e-4)


def test_debiased_ntxent_matches_loop_in_both_regimes():
    z1 = torch.randn(6, 5)
    z2 = z1 + 0.4 * torch.randn(6, 5)
    for t, tau_plus in ((0.5, 0.1), (0.2, 0.3)):
        loss = NTXentLoss(temperature=t, debiased=tau_plus)(z1, z2)
        assert close(loss, naive_debiased_ntxent(z1, z2, t, tau_plus), 1e-4)
    # In the first setting the floor binds for some anchors and not for others, so both
    # branches of the max are checked above (in the second it binds for all).
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sims = z @ z.T / 0.5
    pos = sims[torch.arange(12), (torch.arange(12) + 6) % 12]
    neg_sum = sims.exp().sum(1) - sims.diag().exp() - pos.exp()
    floored = (neg_sum - 0.1 * 10 * pos.exp()) / 0.9 < 10 * math.exp(-1 / 0.5)
    assert 0 < int(floored.sum()) < 12


def test_debiased_analytic_values():
    n, t = 5, 0.5
    # Equal similarities: the estimate equals the plain sum, so the loss is log(2N − 1).
    z = torch.ones(n, 8)
    assert close(NTXentLoss(t, debiased=0.1)(z, z), math.log(2 * n - 1))
    # Orthogonal images, identical views (positive cos 1, negatives cos 0): the estimate is
    # g = (M − 0.1·M·e^{1/τ})/0.9 with M = 2N − 2 when that exceeds the floor M·e^{−1/τ}
    # (τ = 0.5), and the floor when the estimate is negative (τ = 0.2).
    m, z = 2 * n - 2, torch.eye(n)
    g = (m - 0.1 * m * math.exp(1 / t)) / 0.9
    assert g > m * math.exp(-1 / t)
    assert close(NTXentLoss(t, debiased=0.1)(z, z), math.log1p(g / math.exp(1 / t)))
    floor = math.log1p(m * math.exp(-1 / 0.2) / math.exp(1 / 0.2))
    assert close(NTXentLoss(0.2, debiased=0.1)(z, z), floor, 1e-9)
    # τ⁺ = 0 is the plain loss.
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert close(NTXentLoss(0.3, debiased=0.0)(z1, z2), NTXentLoss(0.3)(z1, z2))


def test_debiased_rejects_bad_tau_plus_and_decoupled_together():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="debiased"):
            NTXentLoss(0.1, debiased=bad)
    with pytest.raises(ValueError, match="choose one"):
        NTXentLoss(0.1, decoupled=True, debiased=0.1)
    with pytest.raises(ValueError, match="choose one"):
        InfoNCELoss(0.1, decoupled=True, debiased=0.1)


def test_ntxent_perfect_alignment_goes_to_zero_at_low_temperature():
    # Orthogonal images, identical views: positives at cos 1, negatives at 0.
    z = torch.eye(4)
    assert float(NTXentLoss(0.01)(z, z)) < 1e-30 + 1e-6


@pytest.mark.parametrize("views", [1, 2, 3])
def test_supcon_matches_loop(views):
    feats = torch.randn(6, views, 4)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    loss = SupConLoss(temperature=0.2)(feats, labels)
    assert close(loss, naive_supcon(feats, labels, 0.2), 1e-4)


def test_supcon_without_labels_is_ntxent():
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    a = SupConLoss(0.3)(torch.stack([z1, z2], 1))
    assert close(a, NTXentLoss(0.3)(z1, z2), 1e-5)


def test_supcon_no_positive_anywhere_is_zero_with_graph():
    feats = torch.randn(4, 1, 3, requires_grad=True)
    loss = SupConLoss()(feats, torch.arange(4))
    loss.backward()
    assert float(loss.detach()) == 0 and feats.grad is not None


def test_nnclr_uses_nearest_support_neighbour_and_updates_queue():
    loss_fn = NNCLRLoss(temperature=0.2, queue_size=16)
    support = F.normalize(torch.randn(16, 4), dim=1)
    loss_fn.support.enqueue(support)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    loss = loss_fn(z1, z2)

    def nn_of(z):
        return support[(F.normalize(z, dim=1) @ support.T).argmax(1)]

    nn1, nn2 = nn_of(z1), nn_of(z2)
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    ref = 0.5 * (
        naive_ce_rows(lambda i, j: float(nn1[i] @ u2[j]) / 0.2, 5)
        + naive_ce_rows(lambda i, j: float(nn2[i] @ u1[j]) / 0.2, 5)
    )
    assert close(loss, ref, 1e-4)
    # The queue now holds z1 (normalised) in its 5 oldest slots.
    assert torch.allclose(loss_fn.support.features[:5], u1, atol=1e-6)
    assert int(loss_fn.support.ptr) == 5


def test_nnclr_empty_queue_is_cross_view_infonce():
    loss_fn = NNCLRLoss(temperature=0.5, queue_size=8)
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    ref = 0.5 * (
        naive_ce_rows(lambda i, j: float(u1[i] @ u2[j]) / 0.5, 4)
        + naive_ce_rows(lambda i, j: float(u2[i] @ u1[j]) / 0.5, 4)
    )
    assert close(loss_fn(z1, z2), ref, 1e-4)


def test_bilinear_matches_loop_and_is_shift_invariant():
    loss_fn = BilinearInfoNCELoss(4)
    with torch.no_grad():
        loss_fn.W.copy_(torch.randn(4, 4))
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    W = loss_fn.W.detach()
    assert close(loss_fn(q, k), naive_ce_rows(lambda i, j: float(q[i] @ W @ k[j]), 6), 1e-4)
    # Huge logits (×1000) stay finite thanks to the max subtraction.
    assert torch.isfinite(loss_fn(q * 1000, k * 1000))


def test_clip_matches_loop_and_learns_temperature():
    loss_fn = CLIPLoss(init_temperature=0.1)
    u, v = torch.randn(5, 6), torch.randn(5, 6)
    un, vn = F.normalize(u, dim=1), F.normalize(v, dim=1)
    ref = 0.5 * (
        naive_ce_rows(lambda i, j: float(un[i] @ vn[j]) / 0.1, 5)
        + naive_ce_rows(lambda i, j: float(vn[i] @ un[j]) / 0.1, 5)
    )
    loss = loss_fn(u, v)
    assert close(loss, ref, 1e-4)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad != 0
    assert close(loss_fn.temperature, 0.1)
    fixed = CLIPLoss(0.1, learn_temperature=False)
    assert not any(True for _ in fixed.parameters())


def test_moco_matches_loop_and_enqueues_keys():
    torch.manual_seed(1)
    enc = nn.Linear(6, 4)
    moco = MoCo(enc, 4, queue_size=10, momentum=0.9, temperature=0.2)
    queue_before = moco.queue.get().clone()
    x_q, x_k = torch.randn(3, 6), torch.randn(3, 6)
    k_params = [p.clone() for p in moco.encoder_k.parameters()]
    loss = moco(x_q, x_k)
    # Key encoder moved: θ_k = 0.9·θ_k + 0.1·θ_q (θ_k started as a copy, so unchanged).
    for p_old, p_new, p_q in zip(k_params, moco.encoder_k.parameters(), enc.parameters()):
        assert torch.allclose(p_new, 0.9 * p_old + 0.1 * p_q.detach())
    q = enc(x_q).detach()
    k = moco.encoder_k(x_k).detach()
    assert close(loss, naive_infonce(q, k, queue_before, 0.2), 1e-4)
    assert torch.allclose(moco.queue.features[:3], F.normalize(k, dim=1), atol=1e-6)
    assert int(moco.queue.ptr) == 3
    loss.backward()
    assert enc.weight.grad is not None
    assert all(p.grad is None for p in moco.encoder_k.parameters())


def test_moco_predictor_maps_queries_only():
    torch.manual_seed(3)
    enc, pred = nn.Linear(6, 4), nn.Linear(4, 4)
    moco = MoCo(enc, 4, queue_size=10, momentum=0.9, temperature=0.2, predictor=pred)
    queue_before = moco.queue.get().clone()
    x_q, x_k = torch.randn(3, 6), torch.randn(3, 6)
    loss = moco(x_q, x_k)
    q, k = pred(enc(x_q)).detach(), moco.encoder_k(x_k).detach()  # keys: no predictor
    assert close(loss, naive_infonce(q, k, queue_before, 0.2), 1e-4)
    assert torch.allclose(moco.queue.features[:3], F.normalize(k, dim=1), atol=1e-6)
    n_params = sum(p.numel() for p in moco.encoder_k.parameters())
    assert n_params == sum(p.numel() for p in enc.parameters())  # no copy of the predictor
    loss.backward()
    assert pred.weight.grad is not None and enc.weight.grad is not None


def test_moco_decoupled_leaves_the_positive_out_of_the_denominator():
    torch.manual_seed(1)
    enc = nn.Linear(6, 4)
    moco = MoCo(enc, 4, queue_size=10, momentum=0.9, temperature=0.2, decoupled=True)
    queue_before = moco.queue.get().clone()
    x_q, x_k = torch.randn(3, 6), torch.randn(3, 6)
    loss = moco(x_q, x_k)
    q, k = enc(x_q).detach(), moco.encoder_k(x_k).detach()
    assert close(loss, naive_infonce(q, k, queue_before, 0.2, decoupled=True), 1e-4)


def test_moco_debiased_matches_loop():
    torch.manual_seed(1)
    enc = nn.Linear(6, 4)
    moco = MoCo(enc, 4, queue_size=10, momentum=0.9, temperature=0.5, debiased=0.1)
    queue_before = moco.queue.get().clone()
    x_q, x_k = torch.randn(3, 6), torch.randn(3, 6)
    loss = moco(x_q, x_k)
    q, k = enc(x_q).detach(), moco.encoder_k(x_k).detach()
    assert close(loss, naive_debiased_infonce(q, k, queue_before, 0.5, 0.1), 1e-4)


def test_moco_symmetric_scores_both_views_against_the_queue_before_enqueueing():
    torch.manual_seed(2)
    enc = nn.Linear(6, 4)
    moco = MoCo(enc, 4, queue_size=10, momentum=0.9, temperature=0.2, symmetric=True)
    queue_before = moco.queue.get().clone()
    before = copy.deepcopy(moco)
    before.symmetric = False
    x1, x2 = torch.randn(3, 6), torch.randn(3, 6)
    loss = moco(x1, x2)
    q1, q2 = enc(x1).detach(), enc(x2).detach()
    k1, k2 = moco.encoder_k(x1).detach(), moco.encoder_k(x2).detach()
    # Both directions see the queue as it was: neither view's own key is a negative.
    ref = 0.5 * (naive_infonce(q1, k2, queue_before, 0.2)
                 + naive_infonce(q2, k1, queue_before, 0.2))
    assert close(loss, ref, 1e-4)
    assert torch.allclose(moco.queue.features[:6], F.normalize(torch.cat([k2, k1]), dim=1),
                          atol=1e-6)
    assert int(moco.queue.ptr) == 6
    # Two asymmetric calls differ: the second scores f_k(x2), enqueued by the first, as a
    # negative of f_q(x2), which is the same image and view (f_k = f_q at the start).
    two_calls = 0.5 * (before(x1, x2) + before(x2, x1))
    assert float(two_calls.detach()) > float(ref) + 1e-3


def test_moco_extra_crops_are_queries_against_every_key_of_their_image():
    torch.manual_seed(3)
    enc = nn.Linear(6, 4)
    moco = MoCo(enc, 4, queue_size=20, momentum=0.9, temperature=0.2, symmetric=True)
    queue_before = moco.queue.get().clone()
    n, v = 3, 2
    x1, x2, extra = torch.randn(n, 6), torch.randn(n, 6), torch.randn(v * n, 6)
    loss = moco(x1, x2, extra)
    q = [enc(x).detach() for x in (x1, x2)]
    k = [moco.encoder_k(x).detach() for x in (x1, x2)]
    qe = enc(extra).detach()
    # Pairs: q1→k2, q2→k1, and each extra crop u of image i → k1[i] and → k2[i].
    pairs_q = [q[0], q[1]] + [qe[u * n : (u + 1) * n] for u in range(v) for _ in range(2)]
    pairs_k = [k[1], k[0]] + [k[j] for _ in range(v) for j in range(2)]
    total = sum(naive_infonce(a, b, queue_before, 0.2) * len(a) for a, b in zip(pairs_q, pairs_k))
    assert close(loss, total / (2 * n + 2 * v * n), 1e-4)
    # Only the two views' keys are enqueued.
    assert int(moco.queue.ptr) == 2 * n
    assert torch.allclose(moco.queue.features[: 2 * n], F.normalize(torch.cat([k[1], k[0]]), dim=1),
                          atol=1e-6)
    with pytest.raises(ValueError, match="whole views"):
        moco(x1, x2, torch.randn(4, 6))


def _moco_with_batch_negatives(seed, symmetric):
    """A linear MoCo with ``batch_negatives=True`` and its queue before the first call."""
    torch.manual_seed(seed)
    enc = nn.Linear(6, 4)
    moco = MoCo(enc, 4, queue_size=10, momentum=0.9, temperature=0.2, symmetric=symmetric,
                batch_negatives=True)
    return enc, moco, moco.queue.get().clone()


def naive_batch_negatives(pairs, images, k, n, queue, t):
    """Mean InfoNCE over (query, positive) pairs, where a pair of image i has as negatives
    the queue plus every row c of the batch keys k with c mod n ≠ i."""
    total = 0.0
    for (qr, kr), img in zip(pairs, images):
        others = torch.stack([k[c] for c in range(len(k)) if c % n != img])
        total += naive_infonce(qr[None], kr[None], torch.cat([others, queue]), t)
    return total / len(pairs)


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_batch_negatives_add_the_other_images_keys(symmetric):
    enc, moco, queue_before = _moco_with_batch_negatives(4, symmetric)
    n = 3
    x1, x2 = torch.randn(n, 6), torch.randn(n, 6)
    loss = moco(x1, x2)
    xq, xk = (torch.cat([x1, x2]), torch.cat([x2, x1])) if symmetric else (x1, x2)
    q, k = enc(xq).detach(), moco.encoder_k(xk).detach()
    # Query r (image r mod n): its negatives are the queue plus every key of another image.
    ref = naive_batch_negatives(list(zip(q, k)), [r % n for r in range(len(q))], k, n,
                                queue_before, 0.2)
    assert close(loss, ref, 1e-4)
    assert int(moco.queue.ptr) == len(k)  # the queue is unchanged by the option


def test_moco_batch_negatives_with_extra_crops_leave_out_every_key_of_the_own_image():
    enc, moco, queue_before = _moco_with_batch_negatives(5, symmetric=True)
    n = 2
    x1, x2, extra = torch.randn(n, 6), torch.randn(n, 6), torch.randn(n, 6)
    loss = moco(x1, x2, extra)
    q1, q2, qe = (enc(x).detach() for x in (x1, x2, extra))
    k = moco.encoder_k(torch.cat([x2, x1])).detach()  # keys [k2; k1]
    pairs = [(q1[i], k[i]) for i in range(n)] + [(q2[i], k[n + i]) for i in range(n)]
    pairs += [(qe[i], k[j * n + i]) for j in range(2) for i in range(n)]
    image = [i for _ in range(4) for i in range(n)]
    assert close(loss, naive_batch_negatives(pairs, image, k, n, queue_before, 0.2), 1e-4)


def test_infonce_exclude_drops_negatives_and_checks_its_shape():
    q, k, negs = torch.randn(4, 5), torch.randn(4, 5), torch.randn(6, 5)
    exclude = torch.zeros(4, 6, dtype=torch.bool)
    exclude[0, :3] = exclude[2, 5] = True
    qn, kn, nn_ = (F.normalize(t, dim=1) for t in (q, k, negs))
    got = info_nce(qn, kn, nn_, 0.2, exclude=exclude)
    for r in range(4):
        ref = naive_infonce(q[r : r + 1], k[r : r + 1], negs[~exclude[r]], 0.2)
        assert close(got[r], ref, 1e-4)
    with pytest.raises(ValueError, match="exclude must be"):
        info_nce(qn, kn, nn_, 0.2, exclude=exclude[:, :5])


def test_moco_shuffle_bn_splits_gives_same_keys_without_batchnorm():
    enc = nn.Linear(6, 4)
    a = MoCo(enc, 4, queue_size=8, shuffle_bn_splits=3)
    x = torch.randn(7, 6)
    assert torch.allclose(a._keys(x), F.normalize(a.encoder_k(x), dim=1), atol=1e-6)


def test_moco_shuffle_bn_keeps_two_keys_per_split():
    enc = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    moco = MoCo(enc, 4, queue_size=8, shuffle_bn_splits=2)
    assert torch.isfinite(moco(torch.randn(2, 6), torch.randn(2, 6)))  # one split of 2
    assert torch.isfinite(moco(torch.randn(3, 6), torch.randn(3, 6)))


def test_protonce_instance_term_and_prototypes():
    torch.manual_seed(0)
    loss_fn = ProtoNCELoss(temperature=0.2, num_clusters=(2, 3), memory_size=12)
    q, k = torch.randn(12, 4), torch.randn(12, 4)
    idx = torch.arange(12)
    inst = loss_fn(q, k, index=idx)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    assert close(inst, naive_ce_rows(lambda i, j: float(qn[i] @ kn[j]) / 0.2, 12), 1e-4)
    assert bool(loss_fn.filled.all())
    loss_fn.update_prototypes()
    assert [c.shape[0] for c in loss_fn.prototypes] == [2, 3]
    for phi in loss_fn.concentrations:  # rescaled to mean τ
        assert close(phi.mean(), 0.2, 1e-4)
    full = loss_fn(q, k, index=idx)
    # Reference: instance term + mean over clusterings of the prototype cross-entropy.
    proto = []
    for c, phi, a in zip(loss_fn.prototypes, loss_fn.concentrations, loss_fn.assignments):
        terms = []
        for i in range(12):
            logit = [float(qn[i] @ c[j]) / float(phi[j]) for j in range(len(c))]
            terms.append(-logit[a[i]] + math.log(sum(math.exp(x) for x in logit)))
        proto.append(sum(terms) / 12)
    assert close(full, float(inst) + sum(proto) / len(proto), 1e-4)
    negs = torch.randn(20, 4)
    with_queue = ProtoNCELoss(0.2, (2,))(q, k, negs)
    assert close(with_queue, naive_infonce(q, k, negs, 0.2), 1e-4)


# ---------------------------------------------------------------- gradients
def _double(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _nnclr_with_support():
    # A filled support set makes NN(z) piecewise constant in z, as the formula treats it.
    loss_fn = NNCLRLoss(0.5, queue_size=8)
    loss_fn.support.enqueue(torch.randn(8, 4, dtype=torch.float64))
    return loss_fn


GRADCHECK_CASES = {
    "max_margin": lambda: (
        MaxMarginContrastiveLoss(3.0),
        (_double(4, 3), _double(4, 3), torch.tensor([1, 0, 1, 0]).bool()),
    ),
    "triplet": lambda: (TripletLoss(5.0), (_double(4, 3), _double(4, 3), _double(4, 3))),
    "npair": lambda: (NPairLoss(), (_double(3, 3), _double(3, 3), _double(3, 2, 3))),
    "infonce": lambda: (InfoNCELoss(0.5), (_double(3, 4), _double(3, 4), _double(5, 4))),
    "ntxent": lambda: (NTXentLoss(0.5), (_double(3, 4), _double(3, 4))),
    "ntxent_decoupled": lambda: (NTXentLoss(0.5, decoupled=True), (_double(3, 4), _double(3, 4))),
    "infonce_decoupled": lambda: (
        InfoNCELoss(0.5, decoupled=True), (_double(3, 4), _double(3, 4), _double(5, 4))
    ),
    "ntxent_debiased": lambda: (NTXentLoss(0.5, debiased=0.1), (_double(3, 4), _double(3, 4))),
    "infonce_debiased": lambda: (
        InfoNCELoss(0.5, debiased=0.1), (_double(3, 4), _double(3, 4), _double(5, 4))
    ),
    "supcon": lambda: (SupConLoss(0.5), (_double(4, 2, 3), torch.tensor([0, 1, 0, 1]))),
    "nnclr": lambda: (_nnclr_with_support(), (_double(3, 4), _double(3, 4))),
    "bilinear": lambda: (BilinearInfoNCELoss(3).double(), (_double(3, 3), _double(3, 3))),
    "clip": lambda: (CLIPLoss(0.5).double(), (_double(3, 4), _double(3, 4))),
    "protonce": lambda: (ProtoNCELoss(0.5, (2,)), (_double(4, 3), _double(4, 3))),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck_fp64(name):
    torch.manual_seed(3)
    loss_fn, inputs = GRADCHECK_CASES[name]()
    loss_fn.eval()  # NNCLR's queue must not change between gradcheck's evaluations
    assert torch.autograd.gradcheck(lambda *x: loss_fn(*x), inputs, eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- stability
def _low_t_cases(n=64, d=32):
    q = torch.randn(n, d, requires_grad=True)
    k = (q.detach() + 0.01 * torch.randn(n, d)).requires_grad_()
    return {
        "infonce": (InfoNCELoss(0.01), (q, k, torch.randn(256, d))),
        "ntxent": (NTXentLoss(0.01), (q, k)),
        "ntxent_decoupled": (NTXentLoss(0.01, decoupled=True), (q, k)),
        "infonce_decoupled": (InfoNCELoss(0.01, decoupled=True), (q, k, torch.randn(256, d))),
        "ntxent_debiased": (NTXentLoss(0.01, debiased=0.1), (q, k)),
        "infonce_debiased": (InfoNCELoss(0.01, debiased=0.1), (q, k, torch.randn(256, d))),
        "supcon": (SupConLoss(0.01), (torch.stack([q, k], 1), torch.randint(4, (n,)))),
        "nnclr": (NNCLRLoss(0.01, queue_size=128), (q, k)),
        "clip": (CLIPLoss(0.01), (q, k)),
        "protonce": (ProtoNCELoss(0.01, (4,)), (q, k)),
        "bilinear": (BilinearInfoNCELoss(d), (q * 100, k * 100)),
        "npair": (NPairLoss(), (q * 30, k * 30, torch.randn(n, 8, d) * 30)),
    }


@pytest.mark.parametrize("bf16", [False, True])
def test_finite_at_temperature_001(bf16):
    torch.manual_seed(0)
    for name, (loss_fn, inputs) in _low_t_cases().items():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            inputs = tuple(
                x.to(torch.bfloat16) if bf16 and x.is_floating_point() else x for x in inputs
            )
            loss = loss_fn(*inputs)
        assert torch.isfinite(loss), name
        grads = torch.autograd.grad(
            loss, [x for x in inputs if x.requires_grad], allow_unused=True
        )
        assert all(g is None or torch.isfinite(g).all() for g in grads), name
        assert loss.dtype == torch.float32, name


def test_low_temperature_value_matches_float64():
    q, k = torch.randn(32, 16), torch.randn(32, 16)
    a = NTXentLoss(0.01)(q, k)
    b = NTXentLoss(0.01)(q.double(), k.double())
    assert close(a, b, 1e-4)


# ---------------------------------------------------------------- bad hyperparameters
@pytest.mark.parametrize(
    "build",
    [
        lambda: InfoNCELoss(temperature=0.0),
        lambda: NTXentLoss(temperature=-1),
        lambda: SupConLoss(temperature=float("nan")),
        lambda: NNCLRLoss(temperature=1e-9),
        lambda: NNCLRLoss(queue_size=0),
        lambda: MoCo(nn.Linear(2, 2), 2, momentum=1.5),
        lambda: MoCo(nn.Linear(2, 2), 2, temperature=0),
        lambda: ProtoNCELoss(num_clusters=()),
        lambda: ProtoNCELoss(num_clusters=(1,)),
        lambda: ProtoNCELoss(temperature=0),
        lambda: CLIPLoss(init_temperature=0.001),
        lambda: TripletLoss(margin=-1),
        lambda: MaxMarginContrastiveLoss(margin=float("inf")),
        lambda: BilinearInfoNCELoss(0),
    ],
)
def test_bad_hyperparameters_raise_value_error(build):
    with pytest.raises(ValueError):
        build()
