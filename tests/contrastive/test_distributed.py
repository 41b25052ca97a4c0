"""all_gather with gradients: two gloo processes equal one process with the global batch."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ore.contrastive import NTXentLoss, SupConLoss, all_gather

WORLD = 2
N, D = 4, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inputs():
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(WORLD * N, D, generator=gen)
    z2 = torch.randn(WORLD * N, D, generator=gen)
    feats = torch.randn(WORLD * N, 2, D, generator=gen)
    labels = torch.randint(3, (WORLD * N,), generator=gen)
    return z1, z2, feats, labels


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        z1, z2, feats, labels = _global_inputs()
        sl = slice(rank * N, (rank + 1) * N)
        a = z1[sl].clone().requires_grad_()
        b = z2[sl].clone().requires_grad_()
        loss = NTXentLoss(0.3, gather_distributed=True)(a, b)
        loss.backward()
        f = feats[sl].clone().requires_grad_()
        sup = SupConLoss(0.3, gather_distributed=True)(f, labels[sl])
        sup.backward()
        # Plain gather: rows in rank order, and a gradient that reaches every process.
        x = torch.full((2, 3), float(rank), requires_grad=True)
        g = all_gather(x)
        (g * torch.arange(g.shape[0], dtype=torch.float32)[:, None]).sum().backward()
        torch.save(
            {
                "loss": loss.detach(), "ga": a.grad, "gb": b.grad,
                "sup": sup.detach(), "gf": f.grad, "gathered": g.detach(), "gx": x.grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_gather_with_gradients_equals_global_batch():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
        res = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]

    z1, z2, feats, labels = _global_inputs()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = NTXentLoss(0.3)(a, b)
    ref.backward()
    f = feats.clone().requires_grad_()
    ref_sup = SupConLoss(0.3)(f, labels)
    ref_sup.backward()

    # Global mean = mean of the per-process means (equal batch sizes).
    assert torch.allclose(sum(r["loss"] for r in res) / WORLD, ref, atol=1e-6)
    assert torch.allclose(sum(r["sup"] for r in res) / WORLD, ref_sup, atol=1e-6)
    # DDP averages gradients over processes: local grad / WORLD is the global-loss gradient.
    for r, out in enumerate(res):
        sl = slice(r * N, (r + 1) * N)
        assert torch.allclose(out["ga"] / WORLD, a.grad[sl], atol=1e-6)
        assert torch.allclose(out["gb"] / WORLD, b.grad[sl], atol=1e-6)
        assert torch.allclose(out["gf"] / WORLD, f.grad[sl], atol=1e-6)
        assert out["gathered"][:, 0].tolist() == [0, 0, 1, 1]
        # d/dx_r of Σ_ranks Σ_i i·g_i: rows 2r, 2r+1 of the gathered tensor, summed over
        # the two processes that each computed the same sum.
        expected = torch.tensor([2 * r, 2 * r + 1], dtype=torch.float32)[:, None] * WORLD
        assert torch.allclose(out["gx"], expected.expand(2, 3))
