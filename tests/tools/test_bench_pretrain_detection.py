"""tools/bench_pretrain_detection.py: the schedule overrides, the iterations-to-scratch
figure, the table against hand-computed means, and the detector start holding the
pretrained trunk and pyramid."""

from __future__ import annotations

import statistics

import pytest
import torch

from ore.cli import main as cli_main
from ore.config import load_config
from ore.data.classes import load_task_split
from ore.engine.checkpoint import build_model
from tests.scripts import load_script


@pytest.fixture(scope="module")
def tool():
    return load_script("tools/bench_pretrain_detection.py")


def run(method, seed, curve, steps=None):
    return {"method": method, "seed": seed, "curve": curve, "final": curve[-1],
            "pretrain": {} if steps is None else {"record": {"steps": steps}}}


def point(it, ap, ur=10.0):
    return {"iter": it, "ap50": ap, "u_recall": ur}


def test_schedule_scales_steps_and_warmup_and_keeps_every_checkpoint(tool, toy_root):
    cfg = load_config("toy/t1_train.yaml", [f"DATASETS.ROOT={toy_root}"])
    assert tool.schedule(cfg, None, 50) == ["SOLVER.CHECKPOINT_PERIOD=50",
                                            "SOLVER.KEEP_CHECKPOINTS=9"]
    short = tool.schedule(cfg, 40, 20)
    # 400 → 40 iterations: steps 300, 370 → 30, 37; warm-up 50 → 5.
    assert short == ["SOLVER.CHECKPOINT_PERIOD=20", "SOLVER.KEEP_CHECKPOINTS=3",
                     "SOLVER.MAX_ITER=40", "SOLVER.STEPS=[30,37]", "SOLVER.WARMUP_ITERS=5"]
    scaled = load_config("toy/t1_train.yaml", [f"DATASETS.ROOT={toy_root}", *short])
    assert scaled.SOLVER.MAX_ITER == 40 and list(scaled.SOLVER.STEPS) == [30, 37]


def test_iterations_to_reach_table_and_plot(tool, tmp_path):
    curve = [point(50, 10.0), point(100, 30.0), point(150, 29.0), point(200, 41.0)]
    assert tool.iterations_to_reach(curve, 30.0) == 100
    assert tool.iterations_to_reach(curve, 41.5) is None
    assert tool.iterations_to_reach(curve, None) is None
    results = {
        "scratch": {0: run("scratch", 0, [point(100, 20.0), point(200, 30.0, 25.0)]),
                    1: run("scratch", 1, [point(100, 25.0), point(200, 40.0, 27.0)])},
        "dense": {0: run("dense", 0, [point(100, 31.0), point(200, 35.0, 20.0)], steps=90),
                  1: run("dense", 1, [point(100, 20.0), point(200, 39.0, 22.0)], steps=110)},
    }
    text, summary = tool.table(results)
    # Seed 0 reaches its scratch's 30.0 at 100; seed 1 never reaches 40.0.
    assert summary["dense"]["iterations_to_scratch"] == [100, None]
    assert summary["scratch"]["iterations_to_scratch"] == [200, 200]
    row = next(line for line in text.splitlines() if line.startswith("| dense "))
    sd = statistics.stdev([35.0, 39.0])
    assert f"37.0 ± {sd:.1f}" in row and "21.0 ± 1.4" in row and "100, never" in row
    assert "100 ± 14" in row  # pretraining steps
    tool.plot(results, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temporary left


def test_bad_arguments_are_refused(tool, tmp_path):
    with pytest.raises(SystemExit):
        tool.parse_args(["--world", str(tmp_path), "--methods", "byol"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--world", str(tmp_path), "--pretrain-extra", "byol=--lr 1"])
    args = tool.parse_args(["--world", str(tmp_path), "--methods", "dense",
                            "--pretrain-extra", "dense=--dense-weight 1",
                            "--pretrained-overrides", "MODEL.BACKBONE.NORM=FrozenBN"])
    assert args.methods == ["dense"] and args.pretrain_extra == {"dense": "--dense-weight 1"}
    assert args.pretrained_overrides == ["MODEL.BACKBONE.NORM=FrozenBN"]


def test_start_checkpoint_holds_the_pretrained_trunk_and_pyramid(tool, toy_root, tmp_path):
    weights = tmp_path / "backbone.pth"
    assert cli_main(["pretrain", "--method", "dense", "--list", f"{toy_root}:t1_train",
                     "--arch", "tiny_fpn", "--returned-stages", "2,3,4", "--fpn-channels", "48",
                     "--epochs", "1", "--batch-size", "12", "--image-size", "64",
                     "--hidden-dim", "32", "--out-dim", "16", "--export", "backbone",
                     "--output", str(weights), "--no-progress"]) == 0
    state = torch.load(weights, weights_only=True)
    cfg = load_config("toy/t1_train.yaml", [f"DATASETS.ROOT={toy_root}",
                                            "MODEL.ROI_HEADS.NAME=ore"])
    start = tool.start_checkpoint(cfg, weights, tmp_path)
    # The detector built from it (MODEL.WEIGHTS) holds every pretrained tensor.
    model = build_model(cfg, load_task_split(cfg.DATASETS.CLASSES), start)
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
