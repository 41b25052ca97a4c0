"""Forward+backward time and peak memory of each contrastive loss at N = 1024, D = 128,
against a naive unfused implementation of the same formula in the same run.

The naive versions are what one writes straight from the paper: exp of the similarity
matrix, a multiplicative mask, a sum, then log of the ratio. They materialise extra
N×N matrices and overflow at small temperatures; ours use masked logsumexp. Peak memory
is measured in a fresh subprocess per (loss, implementation) as the growth of the
resident-set high-water mark during one forward+backward (CPU), or with
``torch.cuda.max_memory_allocated`` on a GPU.

    python tools/bench_contrastive.py [--n 1024] [--d 128] [--repeats 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ore.contrastive import (
    BilinearInfoNCELoss,
    CLIPLoss,
    InfoNCELoss,
    MaxMarginContrastiveLoss,
    NNCLRLoss,
    NPairLoss,
    NTXentLoss,
    ProtoNCELoss,
    SupConLoss,
    TripletLoss,
)

M_NEG = 4096  # shared negatives for InfoNCE / the NNCLR support set
M_PAIR = 16  # per-anchor negatives for N-pair


# ---------------------------------------------------------------- naive references
def naive_infonce(q, k, negs, t):
    q, k, negs = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(negs, dim=1)
    pos = torch.exp((q * k).sum(1) / t)
    neg = torch.exp(q @ negs.T / t).sum(1)
    return -torch.log(pos / (pos + neg)).mean()


def naive_ntxent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    e = torch.exp(z @ z.T / t) * (1 - torch.eye(n2, device=z.device))
    pos = torch.cat([torch.diagonal(e, n2 // 2), torch.diagonal(e, -n2 // 2)])
    return -torch.log(pos / e.sum(1)).mean()


def naive_supcon(feats, labels, t):
    n, v, _ = feats.shape
    z = F.normalize(feats.transpose(0, 1).reshape(n * v, -1), dim=1)
    y = labels.repeat(v)
    not_self = 1 - torch.eye(n * v, device=z.device)
    pos = (y[:, None] == y[None]).float() * not_self
    e = torch.exp(z @ z.T / t) * not_self
    log_prob = torch.log(torch.exp(z @ z.T / t) / e.sum(1, keepdim=True))
    return (-(pos * log_prob).sum(1) / pos.sum(1)).mean()


def naive_npair(a, p, negs):
    diff = torch.einsum("nd,nmd->nm", a, negs) - (a * p).sum(1, keepdim=True)
    return torch.log(1 + torch.exp(diff).sum(1)).mean()


def naive_clip(u, v, scale):
    u, v = F.normalize(u, dim=1), F.normalize(v, dim=1)
    e = torch.exp(scale.exp() * u @ v.T)
    d = torch.diagonal(e)
    return 0.5 * (-torch.log(d / e.sum(1)).mean() - torch.log(d / e.sum(0)).mean())


def naive_bilinear(q, k, W):
    e = torch.exp(q @ W @ k.T)
    return -torch.log(torch.diagonal(e) / e.sum(1)).mean()


def naive_cross_view(a, b, t):
    e = torch.exp(a @ b.T / t)
    return -torch.log(torch.diagonal(e) / e.sum(1)).mean()


def naive_nnclr(z1, z2, support, t):
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    s = F.normalize(support, dim=1)
    nn1 = s[(z1 @ s.T).argmax(1)]
    nn2 = s[(z2 @ s.T).argmax(1)]
    return 0.5 * (naive_cross_view(nn1, z2, t) + naive_cross_view(nn2, z1, t))


def naive_max_margin(x, y, same, margin):
    d2 = torch.stack([((a - b) ** 2).sum() for a, b in zip(x, y)])  # row by row
    s = same.float()
    return (s * d2 + (1 - s) * torch.clamp(margin - d2, min=0)).mean()


def naive_triplet(a, p, n, margin):
    losses = [torch.clamp(((ai - pi) ** 2).sum() - ((ai - ni) ** 2).sum() + margin, min=0)
              for ai, pi, ni in zip(a, p, n)]
    return torch.stack(losses).mean()


# ---------------------------------------------------------------- cases
def make_cases(n, d, t, device):
    """name -> (inputs factory, ours(*inputs), naive(*inputs))."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    support = F.normalize(torch.randn(M_NEG, d, generator=g), dim=1).to(device)
    nnclr = NNCLRLoss(t, queue_size=M_NEG).to(device).eval()
    nnclr.support.enqueue(support)
    bil = BilinearInfoNCELoss(d).to(device)
    clip = CLIPLoss(max(t, 0.01)).to(device)
    proto = ProtoNCELoss(t, (8,)).to(device)
    labels = torch.randint(10, (n,), generator=g).to(device)
    same = (torch.rand(n, generator=g) > 0.5).to(device)
    return {
        "max_margin": (lambda: (r(n, d), r(n, d), same), MaxMarginContrastiveLoss(1.0),
                       lambda x, y, s: naive_max_margin(x, y, s, 1.0)),
        "triplet": (lambda: (r(n, d), r(n, d), r(n, d)), TripletLoss(1.0),
                    lambda a, p, q: naive_triplet(a, p, q, 1.0)),
        "npair": (lambda: (r(n, d) / math.sqrt(d), r(n, d) / math.sqrt(d), r(n, M_PAIR, d)),
                  NPairLoss(), naive_npair),
        "infonce": (lambda: (r(n, d), r(n, d), r(M_NEG, d)), InfoNCELoss(t),
                    lambda q, k, m: naive_infonce(q, k, m, t)),
        "ntxent": (lambda: (r(n, d), r(n, d)), NTXentLoss(t),
                   lambda a, b: naive_ntxent(a, b, t)),
        "supcon": (lambda: (r(n, 2, d), labels), SupConLoss(t),
                   lambda f, y: naive_supcon(f, y, t)),
        "nnclr": (lambda: (r(n, d), r(n, d)), nnclr,
                  lambda a, b: naive_nnclr(a, b, support, t)),
        "protonce(instance)": (lambda: (r(n, d), r(n, d), r(M_NEG, d)), proto,
                               lambda q, k, m: naive_infonce(q, k, m, t)),
        "bilinear": (lambda: (r(n, d) / 4, r(n, d) / 4), bil,
                     lambda q, k: naive_bilinear(q, k, bil.W)),
        "clip": (lambda: (r(n, d), r(n, d)), clip,
                 lambda u, v: naive_clip(u, v, clip.logit_scale)),
    }


def fwd_bwd(fn, inputs):
    loss = fn(*inputs)
    loss.backward()
    return float(loss.detach())


def time_it(fn, factory, repeats, device):
    inputs = factory()
    fwd_bwd(fn, inputs)  # warm-up
    times = []
    for _ in range(repeats):
        inputs = factory()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd(fn, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(name, impl, n, d, t, device):
    """Peak extra memory (MiB) of one forward+backward, in this (fresh) process."""
    factory, ours, naive = make_cases(n, d, t, device)[name]
    fn = ours if impl == "ours" else naive
    inputs = factory()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        value = fwd_bwd(fn, inputs)
        return (torch.cuda.max_memory_allocated() - base) / 2**20, value
    # Writing 5 to clear_refs resets the high-water mark (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    value = fwd_bwd(fn, inputs)
    return max(0, _status_kib("VmHWM") - base) / 1024, value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_memory", nargs=2, metavar=("LOSS", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory:
        mib, value = measure_memory(*args._memory, args.n, args.d, args.temperature, args.device)
        print(json.dumps({"mib": mib, "loss": value}))
        return 0

    cases = make_cases(args.n, args.d, args.temperature, args.device)
    print(f"N={args.n} D={args.d} T={args.temperature} device={args.device} "
          f"threads={torch.get_num_threads()}; median fwd+bwd of {args.repeats}")
    print(f"{'loss':>19} {'ours ms':>9} {'naive ms':>9} {'speedup':>8} "
          f"{'ours MiB':>9} {'naive MiB':>10} {'mem ratio':>9}  naive@T=0.01")
    rows = {}
    for name, (factory, ours, naive) in cases.items():
        t_ours = time_it(ours, factory, args.repeats, args.device)
        t_naive = time_it(naive, factory, max(1, args.repeats // 2), args.device)
        mem = {}
        for impl in ("ours", "naive"):
            out = subprocess.run(
                [sys.executable, __file__, "--n", str(args.n), "--d", str(args.d),
                 "--temperature", str(args.temperature), "--device", args.device,
                 "--_memory", name, impl],
                capture_output=True, text=True, check=True,
            )
            mem[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        # Does the naive formula survive temperature 0.01? (ours is tested to)
        low = make_cases(args.n, args.d, 0.01, args.device)[name]
        naive_low = fwd_bwd(low[2], low[0]())
        ok_low = "finite" if math.isfinite(naive_low) else "NaN/inf"
        rows[name] = {
            "ours_ms": 1e3 * t_ours, "naive_ms": 1e3 * t_naive,
            "ours_mib": mem["ours"]["mib"], "naive_mib": mem["naive"]["mib"],
            "loss_ours": mem["ours"]["loss"], "loss_naive": mem["naive"]["loss"],
            "naive_at_t001": ok_low,
        }
        ratio = mem["naive"]["mib"] / mem["ours"]["mib"] if mem["ours"]["mib"] > 0 else float("nan")
        print(f"{name:>19} {1e3 * t_ours:9.2f} {1e3 * t_naive:9.2f} {t_naive / t_ours:7.2f}x "
              f"{mem['ours']['mib']:9.1f} {mem['naive']['mib']:10.1f} {ratio:8.2f}x  {ok_low}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
