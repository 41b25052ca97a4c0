"""Iteration time of the ORE head vs the standard head: same backbone, weights and inputs.

Both detectors are built from one config (only MODEL.ROI_HEADS.NAME differs), the ORE
model receives the standard model's weights, and the two are timed alternately in one
process on the same batches (training step: forward + backward + SGD; inference:
forward in eval mode). Prints median times and the ORE / standard ratio.

    python tools/bench_ore_overhead.py                       # R50-FPN at 640 px, then toy
    python tools/bench_ore_overhead.py --only toy --iters 20

Targets on R50-FPN: ≤ 1.05× in training, ≤ 1.02× in inference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ore.config import load_config  # noqa: E402
from ore.data.classes import load_task_split  # noqa: E402
from ore.data.dataset import DetectionDataset, TrainTransform  # noqa: E402
from ore.data.records import apply_role, load_split  # noqa: E402
from ore.data.toy import write_toy_world  # noqa: E402
from ore.modeling.detector import build_detector  # noqa: E402

SETUPS = {
    # name: (config, overrides, training shortest side, batch)
    "r50_fpn_640": ("owod/t1_train.yaml",
                    ["MODEL.BACKBONE.WEIGHTS=", "DATASETS.CLASSES=toy", "INPUT.MIN_SIZE_TEST=640",
                     "MODEL.ROI_BOX_HEAD.FC_DIM=1024"], 640, 2),
    "toy": ("toy/t1_train.yaml", [], 160, 8),
}


def batches(root, cfg, short: int, bs: int, n: int):
    split = load_task_split(cfg.DATASETS.CLASSES)
    recs = apply_role(load_split(root, "t1_train", split), split, 1, "train")
    ds = DetectionDataset(recs, split, TrainTransform((short, short), 4 * short, 0.5))
    return [[ds[(i * bs + j, i * bs + j)] for j in range(bs)] for i in range(n)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, root: str, iters: int) -> None:
    config, overrides, short, bs = SETUPS[name]
    models = {}
    for head in ("standard", "ore"):
        cfg = load_config(config, [*overrides, f"MODEL.ROI_HEADS.NAME={head}",
                                   # clustering active from the first iteration: worst case
                                   "CLUSTERING.START_ITER=0", "CLUSTERING.UPDATE_MU_ITER=1"])
        torch.manual_seed(0)
        models[head] = build_detector(cfg, load_task_split(cfg.DATASETS.CLASSES))
    missing, _ = models["ore"].load_state_dict(models["standard"].state_dict(), strict=False)
    assert all("store" in k or "iteration" in k for k in missing), missing
    data = batches(root, cfg, short, bs, 4)
    opts = {h: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for h, m in models.items()}

    def train_step(head, batch):
        m = models[head].train()
        losses = m([b[0] for b in batch], [b[1] for b in batch])
        opts[head].zero_grad()
        sum(losses.values()).backward()
        opts[head].step()

    def infer(head, batch):
        m = models[head].eval()
        with torch.inference_mode():
            m([b[0] for b in batch])

    for label, step in (("training", train_step), ("inference", infer)):
        times = {"standard": [], "ore": []}
        for i in range(iters + 2):
            order = ("standard", "ore") if i % 2 == 0 else ("ore", "standard")
            for head in order:  # alternate who goes first: neither gets a warmer cache
                t = timed(lambda h=head, s=step, b=data[i % len(data)]: s(h, b))
                if i >= 2:  # two warm-up rounds
                    times[head].append(t)
        s, o = statistics.median(times["standard"]), statistics.median(times["ore"])
        print(f"{name:12s} {label:9s} batch {bs} @ {short}px: standard {s * 1000:7.1f} ms, "
              f"ORE {o * 1000:7.1f} ms, ratio {o / s:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(SETUPS))
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = str(write_toy_world(f"{tmp}/toy", images_per_task=40, val_images=1,
                                   test_images=1))
        for name in ([args.only] if args.only else list(SETUPS)):
            bench(name, root, args.iters)


if __name__ == "__main__":
    main()
