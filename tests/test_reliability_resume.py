"""Resuming and rerunning never silently starts over or passes old results off as new:
``--resume`` takes the newest readable checkpoint, ``run-tasks`` refuses a stage folder
of another config, and weights that hold NaN are refused by name."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from ore.cli import main
from ore.config import CONFIG_ROOT
from ore.engine.checkpoint import LAST
from ore.engine.layout import FINAL
from ore.engine.metrics_log import read_metrics
from tests.reliability import FAST, save_untrained_weights, train_args, tree, user_error

PERIODIC = ["SOLVER.MAX_ITER=4", "SOLVER.CHECKPOINT_PERIOD=1", "SOLVER.KEEP_CHECKPOINTS=5",
            "SOLVER.LOG_PERIOD=1"]


def test_resume_takes_the_newest_readable_checkpoint(capsys, caplog, tmp_path, toy_root):
    out = tmp_path / "run"
    args = [str(a) for a in train_args(out, toy_root, *PERIODIC)]
    assert main(args) == 0
    (out / FINAL).unlink()  # as if killed before the end
    newest = out / "model_0000003.pth"
    assert (out / LAST).read_text().strip() == newest.name
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.INFO):
        assert main([*args, "--resume"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"skipping checkpoint {newest}" in m for m in messages)
    assert any("resumed from" in m and "model_0000002.pth at iteration 2" in m
               for m in messages)
    assert [r["iter"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    # last_checkpoint naming a file that is gone: the newest periodic one is taken.
    (out / FINAL).unlink()
    (out / LAST).write_text("model_0000009.pth\n")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*args, "--resume"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("model_0000009.pth, which is missing" in m for m in messages)
    assert any("model_0000003.pth at iteration 3" in m for m in messages)
    # No readable checkpoint at all: an error, never a silent restart from iteration 0.
    (out / FINAL).unlink()
    for p in out.glob("model_0*.pth"):
        p.write_bytes(b"")
    before = tree(out)
    msg = user_error(capsys, [*args, "--resume"])
    assert f"{out}: none of its checkpoints is readable" in msg
    assert tree(out) == before


def test_run_tasks_refuses_a_stage_folder_of_another_config(capsys, tmp_path, toy_root):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("base.yaml", "t1_train.yaml"):
        shutil.copy(CONFIG_ROOT / "toy" / name, configs / name)
    out = tmp_path / "tasks"
    args = ["run-tasks", "--configs", configs, "--output", out, "--no-eval",
            f"DATASETS.ROOT={toy_root}", "EBUI.RUN_TASKS=false", *FAST]
    assert main([str(a) for a in args]) == 0
    assert main([str(a) for a in args]) == 0  # the same config: finished, nothing to do
    before = tree(out)
    msg = user_error(capsys, [*args, "MODEL.ROI_HEADS.NAME=standard"])
    assert (f"{out / 't1_train'} holds a run of another config (MODEL.ROI_HEADS.NAME 'ore' "
            "there, 'standard' now); choose another --output") in msg
    assert tree(out) == before
    # Keys that only say how a stage runs may change.
    assert main([str(a) for a in [*args, "DATALOADER.NUM_WORKERS=1"]]) == 0


@pytest.fixture
def nan_weights(tmp_path):
    path = save_untrained_weights(tmp_path / "nan.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["roi_heads.box_predictor.cls_score.weight"][0, 0] = float("nan")
    torch.save(ckpt, path)
    return path


def test_weights_that_hold_nan_are_refused_by_name(capsys, tmp_path, toy_root, nan_weights):
    image = next((toy_root / "JPEGImages").glob("*.jpg"))
    expected = (f"error: {nan_weights}: 1 weight tensors hold NaN or infinite values (e.g. "
                "roi_heads.box_predictor.cls_score.weight); these weights cannot be used")
    assert user_error(capsys, ["detect", "--config", "toy/t1_train.yaml", "--weights",
                               nan_weights, image, "--output", tmp_path / "det"]) == expected
    out = tmp_path / "o"
    assert user_error(capsys, train_args(out, toy_root, f"MODEL.WEIGHTS={nan_weights}")) \
        == expected
    assert not out.exists() and not (tmp_path / "det").exists()
