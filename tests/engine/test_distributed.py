"""Several processes: DDP on gloo equals one process with the global batch; torchrun runs.

The gradient test compares one training step of the detector. Two things make the
comparison exact up to float summation order:

- RPN and RoI sampling (normally random) take evenly spaced candidates instead, so that
  an image's samples do not depend on which process or which position in the batch it
  has; each image still gets exactly ``BATCH_SIZE_PER_IMAGE`` samples (there are plenty
  of negatives), so torchvision's batch-wide loss means are means of per-image means —
  what DDP's averaging of per-process gradients computes;
- GroupNorm (per-image statistics) instead of BatchNorm, and images of one size (no
  padding differences between a batch of 2 and two batches of 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from ore.config import load_config
from ore.data.classes import load_task_split
from ore.data.dataset import DetectionDataset, image_to_tensor, read_image_rgb
from ore.data.records import apply_role, load_split
from ore.engine import distributed as ddp
from ore.engine.layout import FINAL
from ore.engine.metrics_log import read_metrics
from ore.errors import OreError
from ore.modeling.detector import build_detector

WORLD = 2
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # float32; differences come only from summation order
SIZE = (128, 160)  # every test image is resized to this (h, w)
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EvenlySpacedSampler(BalancedPositiveNegativeSampler):
    """The balanced sampler's counts, with evenly spaced picks instead of random ones."""

    def __call__(self, matched_idxs):
        pos_masks, neg_masks = [], []
        for m in matched_idxs:
            pos, neg = torch.where(m >= 1)[0], torch.where(m == 0)[0]
            n_pos = min(int(self.batch_size_per_image * self.positive_fraction), pos.numel())
            n_neg = min(self.batch_size_per_image - n_pos, neg.numel())
            pm, nm = torch.zeros_like(m, dtype=torch.uint8), torch.zeros_like(m, dtype=torch.uint8)
            if n_pos:
                pm[pos[torch.linspace(0, pos.numel() - 1, n_pos).round().long()]] = 1
            if n_neg:
                nm[neg[torch.linspace(0, neg.numel() - 1, n_neg).round().long()]] = 1
            pos_masks.append(pm)
            neg_masks.append(nm)
        return pos_masks, neg_masks


def _cfg(toy_root: Path):
    return load_config("toy/t1_train.yaml", [
        f"DATASETS.ROOT={toy_root}", "MODEL.BACKBONE.NORM=GN", "DEVICE=cpu",
    ])


def _global_batch(toy_root: Path, cfg, n: int):
    """The first ``n`` training images of task 1, resized to SIZE, with their targets."""
    split = load_task_split("toy")
    records = apply_role(load_split(toy_root, "t1_train", split), split, 1, "train")[:n]
    dataset = DetectionDataset(records, split)
    images, targets = [], []
    for i in range(n):
        _, target, meta = dataset[i]
        img = read_image_rgb(meta["file_name"])
        h, w = img.shape[:2]
        img = cv2.resize(img, SIZE[::-1], interpolation=cv2.INTER_LINEAR)
        scale = torch.tensor([SIZE[1] / w, SIZE[0] / h] * 2)
        images.append(image_to_tensor(img))
        targets.append({"boxes": target["boxes"] * scale, "labels": target["labels"]})
    return images, targets


def _one_step_grads(rank: int, world: int, toy_root: Path) -> dict[str, torch.Tensor]:
    """Gradients after one forward/backward of this process's share of the global batch."""
    cfg = _cfg(toy_root)
    torch.manual_seed(0)
    model = build_detector(cfg, load_task_split("toy")).train()
    for head in (model.rpn, model.roi_heads):
        old = head.fg_bg_sampler
        head.fg_bg_sampler = EvenlySpacedSampler(old.batch_size_per_image, old.positive_fraction)
    info = ddp.DistInfo(rank, world) if dist.is_initialized() else ddp.DistInfo()
    wrapped = ddp.wrap_model(model, torch.device("cpu"), info)
    images, targets = _global_batch(toy_root, cfg, WORLD)
    share = slice(rank * WORLD // world, (rank + 1) * WORLD // world)
    losses = wrapped(images[share], targets[share])
    sum(losses.values()).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _grad_worker(rank: int, port: int, toy_root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        grads = _one_step_grads(rank, WORLD, Path(toy_root))
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_global_batch_gradient(toy_root, tmp_path):
    mp.spawn(_grad_worker, args=(_free_port(), str(toy_root), str(tmp_path)), nprocs=WORLD,
             join=True)
    reference = _one_step_grads(0, 1, toy_root)
    assert len(reference) > 20  # backbone, FPN, RPN and box head all get gradients
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert grads.keys() == reference.keys()
        for k, g in reference.items():
            torch.testing.assert_close(grads[k], g, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=k)
    # The comparison is not vacuous: one image alone gives another gradient.
    alone = _one_step_grads(0, 2, toy_root)
    assert any(not torch.allclose(alone[k], reference[k], rtol=1e-3, atol=1e-5)
               for k in reference)


def test_global_batch_must_divide_among_processes():
    assert ddp.per_process_batch(8, 2) == 4
    with pytest.raises(OreError, match="IMS_PER_BATCH=6 must be a multiple of the number "
                                       "of processes \\(4\\)"):
        ddp.per_process_batch(6, 4)
    with pytest.raises(OreError, match="--batch-size=6 must be a multiple"):
        ddp.per_process_batch(6, 4, "--batch-size")


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={WORLD}", "-m", "ore", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_torchrun_two_processes_train_and_resume_identically(toy_root, tmp_path):
    """torchrun -m ore train: rank 0 alone writes; a resumed run ends at the same weights."""
    out = tmp_path / "run"
    args = ["train", "--config", "toy/t1_train.yaml", "--output", str(out),
            f"DATASETS.ROOT={toy_root}", "SOLVER.IMS_PER_BATCH=4", "SOLVER.MAX_ITER=4",
            "SOLVER.CHECKPOINT_PERIOD=2", "SOLVER.LOG_PERIOD=1", "SOLVER.WARMUP_ITERS=1",
            "DATALOADER.NUM_WORKERS=0", "INPUT.MIN_SIZE_TRAIN=[64,80]",
            "INPUT.MAX_SIZE_TRAIN=112", "DETERMINISTIC=true"]
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final weights:") == WORLD  # every process returns the path
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]  # one writer: no duplicated rows
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000002.pth", FINAL]
    ckpt = torch.load(out / "model_0000002.pth", weights_only=True)
    assert ckpt["world_size"] == WORLD and len(ckpt["rng"]["per_rank"]) == WORLD
    # Each process drew from its own stream (seed + rank).
    a, b = (s["torch"] for s in ckpt["rng"]["per_rank"])
    assert not torch.equal(a, b)
    first = torch.load(out / FINAL, weights_only=True)["model"]

    # Crash after the iteration-2 checkpoint: resume on both processes.
    (out / FINAL).unlink()
    proc = _torchrun([*args[:5], "--resume", *args[5:]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = torch.load(out / FINAL, weights_only=True)["model"]
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["iter"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"] > 0
    assert np.isfinite(rows[-1]["loss"])
