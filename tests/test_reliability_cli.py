"""The command line itself: flag values, output paths checked before any work, and
``KEY=VALUE`` overrides anywhere among the arguments; every mistake one ``error:`` line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ore.cli import parse_args
from tests.reliability import user_error


@pytest.mark.parametrize("argv, expected", [
    (["run-tasks", "--configs", "toy", "--output", "{tmp}/r", "--schedule-scale", "nan"],
     "--schedule-scale nan: expected a finite number > 0"),
    (["run-tasks", "--configs", "toy", "--output", "{tmp}/r", "--schedule-scale", "inf"],
     "--schedule-scale inf: expected a finite number > 0"),
    (["run-tasks", "--configs", "toy", "--output", "{tmp}/r", "--schedule-scale", "0"],
     "--schedule-scale 0.0: expected a finite number > 0"),
    (["fit-energy", "--config", "toy/t1_train.yaml", "--weights", "{tmp}/none.pth",
      "--output", "{tmp}/r", "--max-images", "-3"], "--max-images -3 must be ≥ 0"),
])
def test_flag_values_out_of_range(capsys, tmp_path, argv, expected):
    msg = user_error(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert msg.startswith(f"error: {expected}")
    assert not (tmp_path / "r").exists()


# Each command with an --output (or --out) of the wrong kind: "{file}" is an existing file,
# "{dir}" an existing folder, "{under_file}" a path below a file.
COMMANDS = {
    "train": ["train", "--config", "toy/t1_train.yaml", "DATASETS.ROOT={root}", "--output"],
    "detect": ["detect", "--config", "toy/t1_train.yaml", "--weights", "{tmp}/none.pth",
               "{image}", "--output"],
    "demo": ["demo", "--output"],
    "make-toy-data": ["make-toy-data", "--out"],
    "run-tasks": ["run-tasks", "--configs", "toy", "DATASETS.ROOT={root}", "--output"],
    "fit-energy": ["fit-energy", "--config", "toy/t1_train.yaml", "--weights",
                   "{tmp}/none.pth", "--output"],
    "evaluate": ["evaluate", "--config", "toy/t1_train.yaml", "--weights", "{tmp}/none.pth",
                 "--output"],
    "build-exemplars": ["build-exemplars", "--config", "toy/t2_ft.yaml", "--output"],
    "eval-detections": ["eval-detections", "--root", "{root}", "--split", "all_task_test",
                        "--task", "t1", "--classes", "toy", "--detections", "{tmp}/d.json",
                        "--output"],
    "pretrain": ["pretrain", "--method", "simclr", "--images", "{root}/JPEGImages",
                 "--output"],
}
WANTS_FOLDER = ("train", "detect", "demo", "make-toy-data", "run-tasks", "fit-energy")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_output_paths_are_checked_before_any_work(capsys, tmp_path, toy_root, command):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    folder = tmp_path / "folder"
    folder.mkdir()
    image = next((toy_root / "JPEGImages").glob("*.jpg"))
    args = [a.format(tmp=tmp_path, root=toy_root, image=image) for a in COMMANDS[command]]
    flag = args[-1]
    wrong, what = (afile, "is a file; give a folder") if command in WANTS_FOLDER else (
        folder, "is a folder; give a file name")
    assert user_error(capsys, [*args, wrong]) == f"error: {flag}: {wrong} {what}"
    below = afile / "sub" / "out.json"
    assert user_error(capsys, [*args, below]) == (
        f"error: {flag}: cannot create {below}: {afile} is a file, not a folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        msg = user_error(capsys, [*args, locked / "out"])
        assert msg == f"error: {flag}: cannot create {locked / 'out'}: no permission to " \
                      f"write into {locked}"
    assert afile.read_text() == "mine" and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"] + (
        ["locked"] if os.geteuid() != 0 else [])


def test_overrides_stand_anywhere_and_argument_errors_are_one_line(capsys, tmp_path):
    args = parse_args(["train", "--config", "C", "SOLVER.MAX_ITER=5", "--output", "D",
                       "SEED=1", "--resume", "DEVICE=cpu"])
    assert (args.config, args.output, args.resume) == ("C", "D", True)
    assert args.overrides == ["SOLVER.MAX_ITER=5", "SEED=1", "DEVICE=cpu"]
    args = parse_args(["detect", "--config", "C", "a.jpg", "--weights", "W", "b.jpg",
                       "EBUI.ENABLED=true", "--output", "D", "folder"])
    assert args.inputs == ["a.jpg", "b.jpg", "EBUI.ENABLED=true", "folder"]
    assert user_error(capsys, ["train", "--config", "C", "--output", "D", "--bogus"]) == (
        "error: ore train: unrecognized arguments: --bogus (see ore train --help)")
    assert user_error(capsys, ["train", "--output", "D", "SEED=1"]) == (
        "error: ore train: the following arguments are required: --config "
        "(see ore train --help)")
    msg = user_error(capsys, ["detect", "--config", "toy/t1_train.yaml", "--weights", "W",
                              "--output", tmp_path / "d", "SEED=1"])
    assert msg == "error: no INPUT given: name image or video files, folders or patterns"
    assert user_error(capsys, ["nope"]).startswith("error: ore: argument COMMAND: invalid choice")
    assert not Path(tmp_path / "d").exists()
