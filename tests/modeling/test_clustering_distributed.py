"""Feature stores stay identical across processes (2 gloo processes on the CPU)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ore.modeling.clustering import PrototypeStore


def _features(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    n = 3 + 2 * rank  # different counts per process
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    store = PrototypeStore(3, 4, items_per_class=4, momentum=0.5, start_iter=0,
                           update_every=1)
    for step in range(3):
        f, lab = _features(rank)
        store.enqueue(f + step, lab)
        store.step(step)
    torch.save({k: v.clone() for k, v in store.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_stores_match_each_other_and_the_single_process_store(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # One process seeing both processes' features, rank 0's first, gives the same store.
    single = PrototypeStore(3, 4, items_per_class=4, momentum=0.5, start_iter=0,
                            update_every=1)
    for step in range(3):
        (f0, l0), (f1, l1) = _features(0), _features(1)
        single.enqueue(torch.cat([f0, f1]) + step, torch.cat([l0, l1]))
        single.step(step)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(a[k], v)
        torch.testing.assert_close(b[k], v)
    assert bool(a["valid"].any())
