from __future__ import annotations

import pytest

from ore.cli import main
from ore.config import load_config, parse_override
from ore.errors import OreError


def write(path, text):
    path.write_text(text)
    return path


def test_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "SOLVER:\n  BASE_LR: 0.02\n  STEPS: [10, 20]\nSEED: 7\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "mid.yaml", "_BASE_: ../base.yaml\nSOLVER:\n  MAX_ITER: 30\n")
    child = write(sub / "child.yaml", "_BASE_: mid.yaml\nSOLVER:\n  BASE_LR: 0.05\n")
    cfg = load_config(child, ["SOLVER.STEPS=[5]", "MODEL.BACKBONE.NAME=tiny_fpn"])
    assert cfg.SOLVER.BASE_LR == 0.05  # child wins over base
    assert cfg.SOLVER.MAX_ITER == 30  # from the middle file
    assert cfg.SEED == 7  # from the root file
    assert list(cfg.SOLVER.STEPS) == [5]  # command line wins over files
    assert cfg.MODEL.BACKBONE.NAME == "tiny_fpn"
    assert cfg.SOLVER.MOMENTUM == 0.9  # untouched default


def test_builtin_config_dir_is_searched():
    cfg = load_config("toy/t1_train.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "tiny_fpn" and cfg.DATASETS.CLASSES == "toy"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads "1e-4" as a string; the schema still types it as a float.
    cfg = load_config(write(tmp_path / "c.yaml", "SOLVER:\n  WEIGHT_DECAY: 1e-4\n"))
    assert cfg.SOLVER.WEIGHT_DECAY == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("SOLVER:\n  BASE_LRR: 1\n", "unknown key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR?"),
        ("MODEL:\n  RPN:\n    NMS: 0.5\n", "did you mean MODEL.RPN.NMS_THRESH?"),
        ("SOLVER:\n  MAX_ITER: ten\n", "key SOLVER.MAX_ITER: value 'ten' is not of the expected "
                                       "type int"),
        ("SOLVER:\n  STEPS: 5\n", "key SOLVER.STEPS: value 5"),
        ("SOLVER: 3\n", "key SOLVER is a section"),
        ("- a\n- b\n", "expected a mapping"),
        ("SOLVER: [\n", "not valid YAML"),
    ],
)
def test_bad_files_name_file_key_and_value(tmp_path, text, expected):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(OreError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(OreError, match="did you mean SOLVER.MAX_ITER"):
        load_config(None, ["SOLVER.MAX_ITR=5"])
    with pytest.raises(OreError, match="expected KEY=VALUE"):
        load_config(None, ["SOLVER.MAX_ITER"])
    with pytest.raises(OreError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(OreError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_parse_override_nests_and_types():
    assert parse_override("A.B.C=[1, 2]") == {"A": {"B": {"C": [1, 2]}}}
    assert parse_override("X=0.5") == {"X": 0.5}


def test_config_show_cli(capsys, tmp_path):
    assert main(["config", "show", "toy/t1_train.yaml", "SOLVER.MAX_ITER=7"]) == 0
    out = capsys.readouterr().out
    assert "MAX_ITER: 7" in out and "NAME: tiny_fpn" in out
    bad = write(tmp_path / "bad.yaml", "SOLVER:\n  BASE_LRR: 1\n")
    assert main(["config", "show", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "SOLVER.BASE_LR" in err[0]


def test_every_shipped_config_loads_and_the_task_chain_is_complete():
    from ore.config import CONFIG_ROOT
    from ore.data.classes import load_task_split
    from ore.engine.tasks import discover_tasks

    for folder in ("toy", "owod", "sowod", "owod_reference", "sowod_reference"):
        tasks = discover_tasks(CONFIG_ROOT / folder)
        assert [t for t, _, _ in tasks] == [1, 2, 3, 4]
        assert all(ft is not None for t, _, ft in tasks if t > 1)
        for t, train, ft in tasks:
            for f in (train, ft):
                if f is None:
                    continue
                cfg = load_config(f)
                assert cfg.OWOD.TASK == t
                assert cfg.DATASETS.TRAIN_ROLE == ("train" if f == train else "finetune")
                assert cfg.MODEL.ROI_HEADS.NAME == "ore"
                load_task_split(cfg.DATASETS.CLASSES).check_task(t)
