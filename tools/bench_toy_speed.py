"""Training throughput of a detection config on synthetic-free real toy batches.

Measures images/s of full training iterations (forward, backward, SGD step) on batches
from the toy world, for 1 and 2 intra-op threads in the same process, and prints the
ratio. The toy config's target is ≥ 25 images/s on 2 cores at 160 px.

    python tools/bench_toy_speed.py [--config toy/t1_train.yaml] [--iters 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ore.config import load_config  # noqa: E402
from ore.data.classes import load_task_split  # noqa: E402
from ore.data.toy import write_toy_world  # noqa: E402
from ore.engine.checkpoint import build_model  # noqa: E402
from ore.engine.trainer import build_train_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="toy/t1_train.yaml")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_toy_world(f"{tmp}/toy", images_per_task=64, val_images=1, test_images=1)
        cfg = load_config(args.config, [f"DATASETS.ROOT={root}", *args.overrides])
        split = load_task_split(cfg.DATASETS.CLASSES)
        ds = build_train_dataset(cfg, split)
        bs = cfg.SOLVER.IMS_PER_BATCH
        batches = [[ds[(i * bs + j, i * bs + j)] for j in range(bs)]
                   for i in range(len(ds) // bs)]
        torch.manual_seed(0)
        model = build_model(cfg, split).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        sizes = [tuple(b[0].shape[1:]) for batch in batches for b in batch]
        mean_short = sum(min(s) for s in sizes) / len(sizes)
        print(f"config {args.config} {' '.join(args.overrides)}: {cfg.MODEL.ROI_HEADS.NAME} "
              f"head, batch {bs}, mean shortest side {mean_short:.0f} px")
        results = {}
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for i in range(3):  # warm-up
                step(model, opt, batches[i % len(batches)])
            t0 = time.perf_counter()
            for i in range(args.iters):
                step(model, opt, batches[i % len(batches)])
            ips = args.iters * bs / (time.perf_counter() - t0)
            results[threads] = ips
            print(f"threads={threads}: {ips:.1f} images/s")
        if len(results) > 1:
            base = min(results)
            for t, v in results.items():
                print(f"ratio threads={t} / threads={base}: {v / results[base]:.2f}")


def step(model, opt, batch) -> None:
    losses = model([b[0] for b in batch], [b[1] for b in batch])
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()


if __name__ == "__main__":
    main()
