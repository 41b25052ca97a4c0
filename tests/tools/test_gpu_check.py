"""tools/gpu_check.sh: its CPU path (the same steps at a tiny size) and its refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.sh"
ENV = {**os.environ, "PYTHON": sys.executable}


def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600)


def test_cpu_smoke_trains_evaluates_and_reports(tmp_path):
    out = tmp_path / "check"
    r = run("--cpu-smoke", out)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["iterations"] == 4
    assert report["images_per_s_median"] > 0
    assert math.isfinite(report["loss_start"]) and report["loss_start"] > 0
    assert math.isfinite(report["loss_end"]) and report["loss_end"] > 0
    assert 0.0 <= report["known_mAP50"] <= 100.0 and report["a_ose"] >= 0
    for key in ("images_per_s_median", "loss_start", "loss_end", "known_mAP50"):
        assert key in r.stdout
    # Trained through torchrun, in bf16 autocast, at the tiny size asked for.
    cfg = (out / "train" / "config.yaml").read_text()
    assert "AMP: bf16" in cfg and "tiny_fpn" in cfg
    assert (out / "train" / "model_final.pth").is_file()
    # A second call into the same folder is refused and changes nothing.
    before = (out / "gpu_check.json").read_bytes()
    again = run("--cpu-smoke", out)
    assert again.returncode == 2 and "is not empty" in again.stderr
    assert (out / "gpu_check.json").read_bytes() == before


def test_without_cuda_the_gpu_path_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: tools/gpu_check.sh runs the GPU path there")
    r = run(tmp_path / "gpu")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: no CUDA device visible to torch; --cpu-smoke runs the CPU path"]
