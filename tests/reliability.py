"""Helpers of the reliability tests (``tests/test_reliability_*.py``): the one-line error
contract, the fastest training settings, and an untrained toy detector's weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ore.cli import main
from ore.config import load_config
from ore.data.classes import load_task_split
from ore.modeling.detector import build_detector, checkpoint_meta

# Two 64-px iterations in the main process: a run that finishes in a few seconds.
FAST = ["DATALOADER.NUM_WORKERS=0", "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=2",
        "SOLVER.WARMUP_ITERS=0", "INPUT.MIN_SIZE_TRAIN=[64,64]", "INPUT.MAX_SIZE_TRAIN=96",
        "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=96"]


def user_error(capsys, argv: list) -> str:
    """Run the command line; check the contract for a user mistake (exit status 2, one
    ``error:`` line, no traceback); return that line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def train_args(out: Path, root: Path, *extra: str) -> list:
    return ["train", "--config", "toy/t1_train.yaml", "--output", out,
            f"DATASETS.ROOT={root}", *FAST, *extra]


def save_untrained_weights(path: Path, *overrides: str) -> Path:
    """An untrained toy task-1 detector saved as ``ore train`` saves its final weights."""
    cfg = load_config("toy/t1_train.yaml", list(overrides))
    split = load_task_split(cfg.DATASETS.CLASSES)
    torch.manual_seed(0)
    model = build_detector(cfg, split)
    torch.save({"model": model.state_dict(), "meta": checkpoint_meta(cfg, split)}, path)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}
