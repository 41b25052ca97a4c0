"""Config values are checked before anything is written: every numeric key has a valid
range, a wrong element type names the key, and a YAML key given twice is an error."""

from __future__ import annotations

import pytest

from ore.config import CONFIG_ROOT, SCHEMA_TYPES, VALID_RANGES, _leaf_type, load_config
from ore.data.classes import load_task_split
from ore.errors import OreError
from tests.reliability import train_args, user_error


@pytest.mark.parametrize("override, expected", [
    ("SOLVER.MAX_ITER=-5", "SOLVER.MAX_ITER=-5 is out of range; expected an integer ≥ 1"),
    ("SOLVER.CHECKPOINT_PERIOD=0",
     "SOLVER.CHECKPOINT_PERIOD=0 is out of range; expected an integer ≥ 1"),
    ("SOLVER.LOG_PERIOD=0", "SOLVER.LOG_PERIOD=0 is out of range; expected an integer ≥ 1"),
    ("SOLVER.BASE_LR=nan", "SOLVER.BASE_LR=nan is out of range; expected a finite number > 0"),
    ("SOLVER.BASE_LR=.inf",
     "SOLVER.BASE_LR=inf is out of range; expected a finite number > 0"),
    ("SOLVER.STEPS=[5,2]", "SOLVER.STEPS=[5, 2]: expected integers ≥ 1 in increasing order"),
    ("SOLVER.IMS_PER_BATCH=0", "SOLVER.IMS_PER_BATCH=0 is out of range; expected an integer ≥ 1"),
    ("MODEL.RPN.NMS_THRESH=1.5",
     "MODEL.RPN.NMS_THRESH=1.5 is out of range; expected a finite number in [0, 1]"),
    ("INPUT.MIN_SIZE_TRAIN=[0,64]",
     "INPUT.MIN_SIZE_TRAIN=[0, 64] is out of range; expected integers ≥ 1"),
    ("MODEL.ROI_HEADS.BG_IOU_THRESH=0.6",
     "MODEL.ROI_HEADS.BG_IOU_THRESH=0.6 is above MODEL.ROI_HEADS.FG_IOU_THRESH=0.5"),
])
def test_a_value_out_of_range_is_refused_before_anything_is_written(capsys, tmp_path, toy_root,
                                                                    override, expected):
    out = tmp_path / "o"
    msg = user_error(capsys, train_args(out, toy_root, override))
    assert msg.startswith(f"error: {expected}")
    assert not out.exists()


def test_every_numeric_key_has_a_range_and_every_shipped_config_is_in_range():
    numeric = {k for k, tp in SCHEMA_TYPES.items() if _leaf_type(tp) in (int, float)}
    assert sorted(numeric - set(VALID_RANGES)) == []  # numeric keys without a range
    assert sorted(set(VALID_RANGES) - numeric) == []  # ranges of keys that are gone
    for path in sorted(CONFIG_ROOT.glob("*/*.yaml")):
        load_config(path)


def test_a_list_element_of_the_wrong_type_names_the_key_the_value_and_the_type(capsys):
    msg = user_error(capsys, ["config", "show", "toy/t1_train.yaml", "SOLVER.STEPS=[a,b]"])
    assert msg == ("error: override 'SOLVER.STEPS=[a,b]': key SOLVER.STEPS: value ['a', 'b'] "
                   "is not of the expected type list[int] (element 'a' is not of type int)")
    msg = user_error(capsys, ["config", "show", "toy/t1_train.yaml",
                              "MODEL.ANCHOR.SIZES=[[16],[x]]"])
    assert "key MODEL.ANCHOR.SIZES: value [[16], ['x']]" in msg
    assert "(element 'x' is not of type int)" in msg


def test_a_yaml_key_given_twice_names_the_key_and_both_lines(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("_BASE_: toy/t1_train.yaml\nSOLVER:\n  BASE_LR: 0.01\n  MAX_ITER: 5\n"
                   "  BASE_LR: 0.02\n")
    msg = user_error(capsys, ["config", "show", cfg])
    assert msg == (f"error: {cfg}: key SOLVER.BASE_LR is given twice (lines 3 and 5); keep "
                   "one of them")
    cfg.write_text("SEED: 1\nSOLVER: {MAX_ITER: 5}\nSEED: 2\n")
    assert "key SEED is given twice (lines 1 and 3)" in user_error(capsys, ["config", "show",
                                                                            cfg])
    # The same for every YAML file read, e.g. a class split.
    classes = tmp_path / "tasks.yaml"
    classes.write_text("tasks: [[a, b]]\nnever_introduced: [c]\ntasks: [[d]]\n")
    with pytest.raises(OreError, match=r"key tasks is given twice \(lines 1 and 3\)"):
        load_task_split(str(classes))
    # Otherwise YAML reads as yaml.safe_load reads it: anchors and merge keys work.
    cfg.write_text("_BASE_: toy/t1_train.yaml\nSOLVER: &s {MAX_ITER: 7}\n"
                   "EBUI: {<<: {ENABLED: false}, TEMPERATURE: 2.0}\n")
    loaded = load_config(cfg)
    assert loaded.SOLVER.MAX_ITER == 7 and loaded.EBUI.TEMPERATURE == 2.0
