"""Crash-safe runs: a training process killed with SIGKILL resumes to the same weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ore.engine.layout import FINAL
from ore.engine.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[2]


def _train(out: Path, toy_root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "ore", "train", "--config", "toy/t1_train.yaml",
         "--output", str(out), f"DATASETS.ROOT={toy_root}", "SOLVER.IMS_PER_BATCH=2",
         "SOLVER.MAX_ITER=10", "SOLVER.CHECKPOINT_PERIOD=2", "SOLVER.KEEP_CHECKPOINTS=2",
         "SOLVER.LOG_PERIOD=1", "SOLVER.WARMUP_ITERS=2", "SOLVER.STEPS=[5]",
         "DATALOADER.NUM_WORKERS=0", "INPUT.MIN_SIZE_TRAIN=[64,80]", "INPUT.MAX_SIZE_TRAIN=112",
         "DETERMINISTIC=true", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def test_sigkill_at_a_random_moment_then_resume_gives_the_same_weights(toy_root, tmp_path):
    reference = _train(tmp_path / "ref", toy_root)  # runs alongside the one we kill
    victim_dir = tmp_path / "victim"
    victim = _train(victim_dir, toy_root)
    # Kill at a random moment after a random checkpoint exists: mid-iteration, mid-write
    # of a later checkpoint or of metrics.jsonl — wherever it lands.
    rng = random.Random(os.getpid())
    first = victim_dir / f"model_{rng.choice((2, 4, 6)):07d}.pth"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.05))
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    if (victim_dir / FINAL).exists():  # the kill came too late: as if it hit before the end
        (victim_dir / FINAL).unlink()

    _finish(_train(victim_dir, toy_root, "--resume"))
    _finish(reference)
    want = torch.load(tmp_path / "ref" / FINAL, weights_only=True)["model"]
    got = torch.load(victim_dir / FINAL, weights_only=True)["model"]
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # The resumed run's log has each iteration once, and nothing temporary is left.
    assert [r["iter"] for r in read_metrics(victim_dir / "metrics.jsonl")] == list(range(1, 11))
    assert not list(victim_dir.glob(".*"))
    assert len(list(victim_dir.glob("model_0*.pth"))) <= 2  # KEEP_CHECKPOINTS


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random as pyrandom

    import numpy as np

    from ore.engine.runtime import get_rng_state, set_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    pyrandom.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": get_rng_state()}, tmp_path / "c.pth")
    want = (torch.rand(3), np.random.rand(3), np.random.normal(), pyrandom.random())
    set_rng_state(torch.load(tmp_path / "c.pth", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), pyrandom.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2:] == got[2:]


def test_bf16_autocast_trains_on_the_cpu_and_checkpoints_the_scaler(toy_root, tmp_path):
    from ore.config import load_config
    from ore.engine.trainer import Trainer

    cfg = load_config("toy/t1_train.yaml", [
        f"DATASETS.ROOT={toy_root}", "SOLVER.AMP=bf16", "SOLVER.IMS_PER_BATCH=2",
        "SOLVER.MAX_ITER=2", "SOLVER.CHECKPOINT_PERIOD=1", "SOLVER.LOG_PERIOD=1",
        "DATALOADER.NUM_WORKERS=0", "INPUT.MIN_SIZE_TRAIN=[64,64]", "INPUT.MAX_SIZE_TRAIN=96"])
    final = Trainer(cfg, tmp_path / "bf16").run()
    assert final.is_file()
    rows = read_metrics(tmp_path / "bf16" / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    ckpt = torch.load(tmp_path / "bf16" / "model_0000001.pth", weights_only=True)
    assert "scaler" in ckpt and ckpt["iteration"] == 1
    assert {"torch", "numpy", "python", "per_rank"} <= set(ckpt["rng"])
    # Weights stay fp32: autocast changes the arithmetic, not the parameters.
    assert all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())
