"""``ore detect --run``: the model from a run folder (its last stage, or ``--stage``, with its
energy fit), images found in folders and by patterns, videos frame by frame, and the COCO
and CSV results files."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from ore.cli import main
from ore.config import config_to_yaml, load_config
from ore.data.classes import load_task_split
from ore.modeling.fit_file import EnergyFit
from ore.modeling.weibull import Weibull3
from tests.reliability import save_untrained_weights, user_error

SMALL = ["INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=96",
         "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE=3"]


def write_stage(folder: Path, fit: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_to_yaml(load_config("toy/t1_train.yaml", SMALL)))
    save_untrained_weights(folder / "model_final.pth")
    if fit:
        seen = list(load_task_split("toy").seen(1))
        EnergyFit(temperature=1.5, mode="labelled", seen_classes=seen,
                  known=Weibull3(2.0, -5.0, 4.0), unknown=Weibull3(2.0, -5.0, 2.0),
                  counts={"known": 10, "unknown": 5},
                  log_likelihood={"known": -1.0, "unknown": -2.0},
                  ).save(folder / "energy" / "energy_fit.json")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run-tasks folder: task 1 trained, then finetuned and fitted (EBUI)."""
    root = tmp_path_factory.mktemp("run")
    write_stage(root / "t1_train", fit=False)
    write_stage(root / "t1_ft", fit=True)
    (root / "t2_train").mkdir()  # started, never finished: not a candidate
    return root


@pytest.fixture()
def images(tmp_path, toy_root) -> Path:
    """imgs/a.jpg, imgs/sub/b.png, imgs/notes.txt."""
    src = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:2]
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    shutil.copy(src[0], tmp_path / "imgs" / "a.jpg")
    cv2.imwrite(str(tmp_path / "imgs" / "sub" / "b.png"), cv2.imread(str(src[1])))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    return tmp_path / "imgs"


def detect(run: Path, out: Path, *args) -> int:
    return main([str(a) for a in ["detect", "--run", run, *args, "--output", out,
                                  "--score-thresh", "0"]])


def test_run_folder_gives_last_stage_with_its_energy_fit(capsys, tmp_path, run_dir, images):
    out = tmp_path / "det"
    assert detect(run_dir, out, images) == 0
    assert "with EBUI" in capsys.readouterr().out
    records = json.loads((out / "detections.json").read_text())
    # Folders are searched recursively, in sorted order; other files are passed over.
    assert [Path(r["image"]).name for r in records] == ["a.jpg", "b.png"]
    for r in records:
        assert 0 < len(r["boxes"]) <= 3
        assert len(r["energies"]) == len(r["known_logpdf"]) == len(r["labels"])
        assert all(e < 0 for e in r["energies"])  # E = -T logsumexp(…) of real logits
        assert (out / r["drawn"]).is_file()
    # --stage picks the training stage, which has no fit: no EBUI, no energies.
    assert detect(run_dir, tmp_path / "det2", images, "--stage", "t1_train") == 0
    assert "with EBUI" not in capsys.readouterr().out
    records = json.loads((tmp_path / "det2" / "detections.json").read_text())
    assert all("energies" not in r for r in records)
    # An override still wins over the run's fit.
    assert detect(run_dir, tmp_path / "det3", images, "EBUI.ENABLED=false") == 0
    assert "with EBUI" not in capsys.readouterr().out


def test_a_train_output_folder_and_a_glob(capsys, tmp_path, run_dir, images):
    out = tmp_path / "det"
    assert detect(run_dir / "t1_train", out, str(images / "**" / "*.png")) == 0
    records = json.loads((out / "detections.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["b.png"]


def test_coco_results_load_in_pycocotools_and_csv_rows(tmp_path, run_dir, images):
    out = tmp_path / "det"
    assert detect(run_dir, out, images, "--format", "coco", "--format", "csv") == 0
    records = json.loads((out / "detections.json").read_text())
    gt = COCO(str(out / "coco_images.json"))
    res = gt.loadRes(str(out / "coco_results.json"))
    n = sum(len(r["boxes"]) for r in records)
    assert len(res.getAnnIds()) == n > 0
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    assert "unknown" in names.values() and "__background__" not in names.values()
    first = res.loadAnns(res.getAnnIds(imgIds=[1]))
    x1, y1, x2, y2 = records[0]["boxes"][0]
    want = [x1, y1, x2 - x1, y2 - y1]
    assert any(np.allclose(a["bbox"], want, atol=0.02) for a in first)
    assert sorted(names[a["category_id"]] for a in first) == sorted(records[0]["labels"])
    assert gt.loadImgs([2])[0]["width"] == records[1]["width"]
    with open(out / "detections.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n
    assert rows[0]["image"] == records[0]["image"] and rows[0]["energy"] != ""
    assert {r["unknown"] for r in rows} <= {"0", "1"}
    assert all((r["label"] == "unknown") == (r["unknown"] == "1") for r in rows)


def write_video(path: Path, toy_root: Path, frames: int) -> Path:
    src = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:frames]
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 80))
    for p in src:
        w.write(cv2.resize(cv2.imread(str(p)), (96, 80)))
    w.release()
    return path


def test_video_every_nth_frame_gives_a_drawn_video_and_frame_records(capsys, tmp_path,
                                                                      run_dir, toy_root):
    (tmp_path / "in").mkdir()
    clip = write_video(tmp_path / "in" / "clip.avi", toy_root, 5)
    out = tmp_path / "det"
    assert detect(run_dir, out, clip, "--every", "2", "--format", "coco") == 0
    assert "1 videos (3 frames)" in capsys.readouterr().out
    records = json.loads((out / "detections.json").read_text())
    assert [r["frame"] for r in records] == [0, 2, 4]
    assert {r["drawn"] for r in records} == {"clip.avi"}
    assert all((r["height"], r["width"]) == (80, 96) for r in records)
    cap = cv2.VideoCapture(str(out / "clip.avi"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    names = [im["file_name"] for im in json.loads((out / "coco_images.json").read_text())[
        "images"]]
    assert names == [f"{clip}#{i}" for i in (0, 2, 4)]


def test_run_and_input_mistakes_are_one_line_before_any_work(capsys, tmp_path, run_dir,
                                                             images):
    out = tmp_path / "det"
    cases = {
        "not a folder": ["detect", "--run", tmp_path / "nope", images, "--output", out],
        "--stage 't9'": ["detect", "--run", run_dir, "--stage", "t9", images, "--output", out],
        "no folder": ["detect", "--run", run_dir, "--stage", "t3_ft", images, "--output", out],
        "t2_train/config.yaml not found": ["detect", "--run", run_dir, "--stage", "t2_train",
                                           images, "--output", out],
        "leave out --config": ["detect", "--run", run_dir, "--config", "toy/t1_train.yaml",
                               images, "--output", out],
        "--config and --weights missing": ["detect", images, "--output", out],
        "--stage needs --run": ["detect", "--stage", "t1_ft", "--config", "toy/t1_train.yaml",
                                "--weights", "w.pth", images, "--output", out],
        "--every 0": ["detect", "--run", run_dir, images, "--every", "0", "--output", out],
        "matches no image": ["detect", "--run", run_dir, str(images / "*.gif"), "--output", out],
        "no model_final.pth": ["detect", "--run", images, images, "--output", out],
    }
    for want, argv in cases.items():
        assert want in user_error(capsys, argv), want
    assert not out.exists()


def test_a_results_file_of_someone_else_is_never_replaced(capsys, tmp_path, run_dir, images):
    out = tmp_path / "det"
    out.mkdir()
    (out / "detections.csv").write_text("mine")
    msg = user_error(capsys, ["detect", "--run", run_dir, images, "--output", out,
                              "--format", "csv"])
    assert f"{out / 'detections.csv'} was not written by ore detect" in msg
    assert (out / "detections.csv").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["detections.csv"]
    # Without --format csv, detect writes beside it and leaves it alone; a second run with
    # csv then still refuses it, while its own files are rewritten freely.
    assert detect(run_dir, out, images, "--format", "coco") == 0
    assert detect(run_dir, out, images, "--format", "coco") == 0
    assert (out / "detections.csv").read_text() == "mine"
    assert "was not written" in user_error(capsys, ["detect", "--run", run_dir, images,
                                                    "--output", out, "--format", "csv"])


def test_the_demo_command_runs_on_a_demo_layout(tmp_path, run_dir, images):
    from ore.cli.demo import detect_command

    demo = tmp_path / "my demo"
    shutil.copytree(run_dir, demo / "ore")
    shutil.copytree(images, demo / "toy-data" / "JPEGImages")
    argv = shlex.split(detect_command(demo))
    assert argv[:2] == ["ore", "detect"]
    assert main([*argv[1:], "--score-thresh", "0"]) == 0
    assert (demo / "detections" / "detections.json").is_file()


def test_the_demo_serve_command_names_its_ore_run(tmp_path):
    from ore.cli import parse_args
    from ore.cli.demo import serve_command

    args = parse_args(shlex.split(serve_command(tmp_path / "d"))[1:])
    assert args.command == "serve" and args.run == str(tmp_path / "d" / "ore")


VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


@pytest.mark.skipif(not VTEST.is_file() and not os.environ.get("CI"),
                    reason="Debian package opencv-doc is not installed (.ci/run installs it; "
                           "under CI=true this test runs and fails)")
def test_a_real_clip_opencvs_vtest_avi(capsys, tmp_path, run_dir):
    """OpenCV's pedestrian clip (795 frames of 768×576 at 10 fps, XVID): every 200th frame."""
    out = tmp_path / "det"
    assert detect(run_dir, out, VTEST, "--every", "200") == 0
    assert "1 videos (4 frames)" in capsys.readouterr().out
    records = json.loads((out / "detections.json").read_text())
    assert [r["frame"] for r in records] == [0, 200, 400, 600]
    assert all((r["height"], r["width"]) == (576, 768) for r in records)
    assert all(b[2] <= 768 and b[3] <= 576 for r in records for b in r["boxes"])
    cap = cv2.VideoCapture(str(out / "vtest.avi"))
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (768, 576)
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 4


def test_draw_thresh_limits_the_drawing_not_the_results(capsys, tmp_path, run_dir, images):
    """--draw-thresh 1 draws nothing (the output is the picture itself), 0 draws every
    detection; detections.json holds the same detections either way."""
    src = cv2.imread(str(images / "a.jpg"))
    records = {}
    for thresh in ("1", "0"):
        out = tmp_path / f"det{thresh}"
        assert detect(run_dir, out, images / "a.jpg", "--draw-thresh", thresh) == 0
        n = len(json.loads((out / "detections.json").read_text())[0]["boxes"])
        assert f"({n if thresh == '0' else 0} scoring ≥ {thresh} drawn)" in (
            capsys.readouterr().out)
        drawn = cv2.imread(str(out / "a.jpg")).astype(int)
        diff = np.abs(drawn - src.astype(int)).max(axis=2)
        changed = int((diff > 60).sum())  # JPEG re-encoding alone stays under 25
        assert (changed > 100) if thresh == "0" else (changed == 0)
        records[thresh] = json.loads((out / "detections.json").read_text())
    assert records["0"] == records["1"]
    assert len(records["0"][0]["boxes"]) > 0
    assert "--draw-thresh 1.5" in user_error(capsys, ["detect", "--run", run_dir, images,
                                                      "--draw-thresh", "1.5", "--output",
                                                      tmp_path / "x"])
