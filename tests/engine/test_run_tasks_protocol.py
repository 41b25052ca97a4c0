"""run-tasks reruns under the other test-list protocol: training reused, evaluation redone."""

from __future__ import annotations

import json

from ore.cli import main
from ore.config import CONFIG_ROOT


def test_rerun_with_unique_images_reevaluates_without_retraining(toy_root, tmp_path, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("base.yaml", "t1_train.yaml"):
        (configs / name).write_text((CONFIG_ROOT / "toy" / name).read_text())
    out = tmp_path / "run"
    args = ["run-tasks", "--configs", str(configs), "--output", str(out),
            f"DATASETS.ROOT={toy_root}", "SOLVER.MAX_ITER=2", "SOLVER.IMS_PER_BATCH=2",
            "DATALOADER.NUM_WORKERS=0", "EBUI.RUN_TASKS=false", "INPUT.MIN_SIZE_TRAIN=[96]"]
    assert main(args) == 0
    eval_file = out / "t1_train" / "eval.json"
    assert json.loads(eval_file.read_text())["protocol"] == "listed-lines"
    weights = out / "t1_train" / "model_final.pth"
    trained = weights.stat().st_mtime_ns
    assert main([*args, "--unique-images"]) == 0, capsys.readouterr().err
    assert weights.stat().st_mtime_ns == trained  # the training is the same run
    assert json.loads(eval_file.read_text())["protocol"] == "unique-images"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["t1"]["train"]["protocol"] == "unique-images"
