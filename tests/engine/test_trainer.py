from __future__ import annotations

import json

import pytest
import torch
import yaml

from ore.cli import main
from ore.config import load_config
from ore.engine.layout import FINAL
from ore.engine.metrics_log import read_metrics
from ore.engine.runtime import lr_at
from ore.engine.trainer import Trainer
from ore.fileio import atomic_write

QUICK = ["SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=6", "SOLVER.CHECKPOINT_PERIOD=3",
         "SOLVER.LOG_PERIOD=2", "SOLVER.WARMUP_ITERS=2", "SOLVER.STEPS=[4]",
         "DATALOADER.NUM_WORKERS=0", "INPUT.MIN_SIZE_TRAIN=[96,112]", "DETERMINISTIC=true",
         "MODEL.ROI_HEADS.NAME=standard"]


def quick_cfg(toy_root, *extra):
    return load_config("toy/t1_train.yaml", [f"DATASETS.ROOT={toy_root}", *QUICK, *extra])


def quick_config_file(toy_root, folder) -> str:
    """The quick settings written as a config file, for commands that take no overrides."""
    data: dict = {"_BASE_": "toy/t1_train.yaml"}
    for item in [f"DATASETS.ROOT={toy_root}", *QUICK]:
        key, value = item.split("=", 1)
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    path = folder / "quick.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_lr_schedule_matches_hand_values():
    cfg = load_config(None, ["SOLVER.BASE_LR=0.1", "SOLVER.WARMUP_ITERS=10",
                             "SOLVER.WARMUP_FACTOR=0.01", "SOLVER.STEPS=[20,30]",
                             "SOLVER.GAMMA=0.5"])
    assert lr_at(cfg, 0) == pytest.approx(0.001)
    assert lr_at(cfg, 5) == pytest.approx(0.1 * (0.01 * 0.5 + 0.5))
    assert lr_at(cfg, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 20) == pytest.approx(0.05)
    assert lr_at(cfg, 35) == pytest.approx(0.025)


def test_train_checkpoint_detect_round_trip(toy_root, tmp_path, capsys):
    out = tmp_path / "run"
    final = Trainer(quick_cfg(toy_root), out).run()
    assert final == out / FINAL and final.is_file()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [2, 4, 6]
    assert all(r["loss"] > 0 and "loss_classifier" in r and "lr" in r for r in rows)
    assert (out / "model_0000003.pth").is_file() and (out / "last_checkpoint").is_file()
    assert not list(out.glob(".*tmp"))  # no temporary files left behind
    images = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:3]
    det_dir = tmp_path / "det"
    cfg_file = quick_config_file(toy_root, tmp_path)
    rc = main(["detect", "--config", cfg_file, "--weights", str(final),
               *map(str, images), "--output", str(det_dir), "--score-thresh", "0.0"])
    assert rc == 0
    records = json.loads((det_dir / "detections.json").read_text())
    assert [r["image"] for r in records] == list(map(str, images))
    import cv2
    for r, path in zip(records, images):
        h, w = cv2.imread(str(path)).shape[:2]
        assert (det_dir / r["drawn"]).is_file()
        assert len(r["boxes"]) == len(r["labels"]) == len(r["scores"])
        for (x1, y1, x2, y2), label in zip(r["boxes"], r["labels"]):
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h  # original pixel coordinates
            assert label in {"circle", "square", "triangle", "cross", "star"}  # task-1 classes
    # The same weights through the open-world evaluator on the toy test list.
    metrics_file = tmp_path / "eval.json"
    assert main(["evaluate", "--config", cfg_file, "--weights", str(final),
                 "--output", str(metrics_file)]) == 0
    result = json.loads(metrics_file.read_text())
    assert set(result["per_class_ap"]) == {"circle", "square", "triangle", "cross", "star",
                                           "unknown"}
    assert result["known_mAP_prev"] is None  # task 1 has no previously known class
    assert result["unknown_recall"] == 0.0  # the closed-set head never says unknown
    assert "known mAP50 both" in capsys.readouterr().out
    # A second run into the same folder without --resume is refused.
    assert main(["train", "--config", "toy/t1_train.yaml", "--output", str(out),
                 f"DATASETS.ROOT={toy_root}"]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_resume_after_crash_gives_the_same_weights(toy_root, tmp_path):
    a = Trainer(quick_cfg(toy_root), tmp_path / "a").run()
    b_dir = tmp_path / "b"
    Trainer(quick_cfg(toy_root), b_dir).run()
    # Pretend the run died after its iteration-3 checkpoint.
    (b_dir / FINAL).unlink()
    b = Trainer(quick_cfg(toy_root), b_dir, resume=True).run()
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["iter"] for r in read_metrics(b_dir / "metrics.jsonl")] == [2, 4, 6]


def test_nan_loss_stops_with_the_iteration(toy_root, tmp_path, capsys):
    rc = main(["train", "--config", "toy/t1_train.yaml", "--output", str(tmp_path / "nan"),
               f"DATASETS.ROOT={toy_root}", "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=20",
               "SOLVER.BASE_LR=1e30", "SOLVER.WARMUP_ITERS=0", "DATALOADER.NUM_WORKERS=0",
               "INPUT.MIN_SIZE_TRAIN=[96,96]"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "loss became" in errors[0] and "at iteration" in errors[0]
    assert not (tmp_path / "nan" / FINAL).exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_atomic_outputs_get_umask_modes_not_temp_file_modes(tmp_path):
    import os
    import stat

    from ore.fileio import atomic_folder, atomic_write_text

    umask = os.umask(0o022)
    os.umask(umask)
    # mkstemp/mkdtemp would leave 0600/0700; a plain open()/mkdir gives these.
    f = atomic_write_text(tmp_path / "out.json", "{}")
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
    with atomic_folder(tmp_path / "folder") as d:
        (d / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~umask


def test_optimizer_choice_and_a_bad_name():
    from ore.engine.runtime import build_optimizer
    from ore.errors import OreError

    params = [torch.nn.Parameter(torch.ones(3))]
    for name, kind in (("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)):
        cfg = load_config("toy/t1_train.yaml", [f"SOLVER.OPTIMIZER={name}",
                                                 "SOLVER.WEIGHT_DECAY=0.5"])
        opt = build_optimizer(cfg, params)
        assert type(opt) is kind
        assert opt.param_groups[0]["weight_decay"] == 0.5
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(cfg, 0))
    cfg = load_config("toy/t1_train.yaml", ["SOLVER.OPTIMIZER=adam"])
    with pytest.raises(OreError, match=r"SOLVER.OPTIMIZER: 'adam'; expected one of"):
        build_optimizer(cfg, params)


def test_environment_sets_then_restores_variables(monkeypatch):
    import os

    from ore.engine.runtime import environment

    monkeypatch.setenv("ORE_TEST_SET", "before")
    monkeypatch.delenv("ORE_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError), environment(ORE_TEST_SET="1", ORE_TEST_UNSET="2"):
        assert (os.environ["ORE_TEST_SET"], os.environ["ORE_TEST_UNSET"]) == ("1", "2")
        raise RuntimeError  # restored on the way out of a failing block too
    assert os.environ["ORE_TEST_SET"] == "before" and "ORE_TEST_UNSET" not in os.environ
