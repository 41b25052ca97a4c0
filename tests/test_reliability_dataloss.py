"""Nothing lost: no command deletes or overwrites a file it did not write.

``make-toy-data --overwrite`` replaces only a toy world; ``detect`` never writes over its
inputs nor over another file in its output folder; ``train`` never writes into a folder
that holds a run unless told to continue it (``--resume``) or replace it (``--overwrite``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ore.cli import main
from ore.data.toy import MARKER
from ore.engine.layout import CONFIG, FINAL
from tests.reliability import save_untrained_weights, train_args, tree, user_error

TINY_WORLD = ["--images-per-task", "2", "--val-images", "1", "--test-images", "1",
              "--exemplars-per-class", "1"]


def make_toy(out) -> list:
    return ["make-toy-data", "--out", out, *TINY_WORLD]


# --- make-toy-data --------------------------------------------------------------------

def test_make_toy_data_overwrite_replaces_only_a_toy_world(capsys, tmp_path, monkeypatch):
    world = tmp_path / "world"
    assert main([str(a) for a in make_toy(world)]) == 0 and (world / MARKER).is_file()
    before = (world / "Annotations" / "000001.xml").read_text()
    # Without --overwrite an existing world is kept; with it, it is replaced.
    assert "pass --overwrite" in user_error(capsys, make_toy(world))
    assert main([str(a) for a in make_toy(world) + ["--overwrite", "--seed", "1"]]) == 0
    assert (world / "Annotations" / "000001.xml").read_text() != before  # another seed
    # A folder of the user's, even with --overwrite, is refused and left as it is.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    msg = user_error(capsys, make_toy(mine) + ["--overwrite"])
    assert f"{mine} is not empty and holds no toy world" in msg
    # The current folder, its parents and the home folder are never replaced.
    inner = mine / "inner"
    inner.mkdir()
    monkeypatch.chdir(inner)
    monkeypatch.setenv("HOME", str(tmp_path))
    for target in (".", "..", str(tmp_path)):
        msg = user_error(capsys, make_toy(target) + ["--overwrite"])
        assert "holds the current folder, the home folder or the whole file system" in msg
    assert (mine / "notes.txt").read_text() == "mine" and inner.is_dir()


def test_precious_file_survives_every_make_toy_data_attempt(capsys, tmp_path, monkeypatch):
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    precious = work / "thesis.tex"
    precious.write_text("three years of work")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    before = tree(home)
    for target in (".", "..", work, home, precious, work / "thesis.tex" / "sub"):
        for extra in ([], ["--overwrite"]):
            user_error(capsys, make_toy(target) + extra)
    assert tree(home) == before
    assert precious.read_text() == "three years of work"


# --- detect ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_untrained_weights(tmp_path_factory.mktemp("w") / "model_final.pth")


def photos(folder: Path, toy_root: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:n]
    return [Path(shutil.copy(p, folder / f"photo{i}.jpg")) for i, p in enumerate(sources)]


def detect(weights: Path, output, *inputs) -> list:
    return ["detect", "--config", "toy/t1_train.yaml", "--weights", weights,
            "--output", output, *inputs, *("INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=96")]


def test_detect_output_that_is_contains_or_lies_inside_an_input(capsys, tmp_path, toy_root,
                                                                weights):
    imgs = tmp_path / "imgs" / "x"
    first, _ = photos(imgs, toy_root)
    for output, inputs in ((imgs, [imgs]),                    # is the input folder
                           (imgs / "drawn", [imgs]),          # lies inside it
                           (imgs.parent, [imgs]),             # contains it
                           (imgs, [first]),                   # contains an input file
                           (first, [first])):                 # is the input file
        msg = user_error(capsys, detect(weights, output, *inputs))
        assert "--output" in msg and str(output) in msg
    assert not (imgs / "drawn").exists() and not (imgs / "detections.json").exists()


def test_precious_photos_survive_detect(capsys, tmp_path, toy_root, weights):
    imgs = tmp_path / "imgs" / "x"
    photos(imgs, toy_root)
    before = tree(imgs)
    user_error(capsys, detect(weights, imgs, imgs))
    user_error(capsys, detect(weights, imgs, imgs / "photo0.jpg"))
    assert tree(imgs) == before
    # An output folder of the user's that holds a file a drawn copy would be named after:
    # that file is kept and the drawn copy takes another name.
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo0.jpg").write_bytes(b"my own photo0")
    assert main([str(a) for a in detect(weights, out, imgs)]) == 0
    assert (out / "photo0.jpg").read_bytes() == b"my own photo0"
    drawn = [r["drawn"] for r in json.loads((out / "detections.json").read_text())]
    assert drawn == ["photo0_1.jpg", "photo1.jpg"]
    assert tree(imgs) == before
    # A second detect into the same folder replaces its own copies, never the user's.
    assert main([str(a) for a in detect(weights, out, imgs)]) == 0
    assert (out / "photo0.jpg").read_bytes() == b"my own photo0"
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "photo0.jpg",
                                                     "photo0_1.jpg", "photo1.jpg"]


# --- train -----------------------------------------------------------------------------

def test_train_refuses_a_finished_run_without_periodic_checkpoints(capsys, tmp_path, toy_root):
    out = tmp_path / "ft"
    # Two iterations, the toy CHECKPOINT_PERIOD of 200: a run with final weights only.
    assert main([str(a) for a in train_args(out, toy_root)]) == 0
    assert not list(out.glob("model_0*.pth")) and (out / FINAL).is_file()
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    msg = user_error(capsys, train_args(out, toy_root, "SEED=1"))
    assert f"{out} already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert tree(out) == before
    assert "exclude each other" in user_error(
        capsys, train_args(out, toy_root, "--resume", "--overwrite"))
    # --overwrite replaces the run's own files and nothing else.
    assert main([str(a) for a in train_args(out, toy_root, "SEED=1", "--overwrite")]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / FINAL).read_bytes() != before[FINAL]
    assert "SEED: 1" in (out / CONFIG).read_text()
