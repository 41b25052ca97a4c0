"""``ore add-task``: labelled clusters become the run's next task, trained and finetuned by
the run-tasks steps, with its own dataset folder, the grown class split, and resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ore.cli import main
from ore.config import CONFIG_ROOT, config_to_yaml
from ore.data.classes import TOY_TASKS, load_task_split
from ore.data.records import load_voc_split, parse_voc_xml, voc_xml
from ore.engine.tasks import run_tasks
from tests.reliability import user_error

TINY = ["SOLVER.MAX_ITER=2", "SOLVER.STEPS=[1]", "SOLVER.WARMUP_ITERS=0",
        "SOLVER.CHECKPOINT_PERIOD=2", "DATALOADER.NUM_WORKERS=0", "EBUI.RUN_TASKS=false",
        "EXEMPLARS.PER_CLASS=2", "INPUT.MIN_SIZE_TRAIN=[96]", "INPUT.MAX_SIZE_TRAIN=160",
        "INPUT.MIN_SIZE_TEST=96", "INPUT.MAX_SIZE_TEST=160"]
NEW = {"cluster_00": "spiral", "cluster_01": "bolt", "cluster_02": "ignore"}
TRUE = {"cluster_00": "spiral", "cluster_01": "bolt", "cluster_02": "hourglass"}


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory, toy_root) -> tuple[Path, Path]:
    """A run-tasks folder of two toy tasks (the other shapes never introduced)."""
    tmp = tmp_path_factory.mktemp("loop")
    split = tmp / "two.yaml"
    rest = [c for t in TOY_TASKS[2:] for c in t] + ["spiral", "hourglass", "bolt"]
    split.write_text(yaml.safe_dump({"tasks": [list(TOY_TASKS[0]), list(TOY_TASKS[1])],
                                     "never_introduced": rest}))
    configs = tmp / "configs"
    configs.mkdir()
    for name in ("t1_train", "t2_train", "t2_ft"):
        (configs / f"{name}.yaml").write_text(
            f"_BASE_: {CONFIG_ROOT / 'toy' / (name + '.yaml')}\n")
    run = tmp / "run"
    run_tasks(configs, run, [f"DATASETS.ROOT={toy_root}", f"DATASETS.CLASSES={split}", *TINY],
              evaluate=False)
    return run, split


def _labels(tmp: Path, toy_root: Path) -> Path:
    """A VOC labels folder as discover writes it: the never-introduced shapes of the
    training images, named by cluster."""
    split = load_task_split("toy")
    cluster = {v: k for k, v in TRUE.items()}
    out = tmp / "labels"
    (out / "Annotations").mkdir(parents=True)
    (out / "JPEGImages").mkdir()
    records = {r.image_id: r for name in ("t1_train", "t2_train", "t3_train")
               for r in load_voc_split(toy_root, name, split)}
    for r in records.values():
        keep = np.array([n in cluster for n in r.names], bool)
        if keep.any():
            r = r.select(keep)
            r.names = [cluster[n] for n in r.names]
            (out / "Annotations" / f"{r.image_id}.xml").write_text(voc_xml(r))
            os.symlink(Path(r.file_name).resolve(), out / "JPEGImages" / Path(r.file_name).name)
    return out


def _coco(voc: Path, tmp: Path) -> Path:
    images, anns, cats = [], [], {c: i + 1 for i, c in enumerate(sorted(TRUE))}
    for k, xml in enumerate(sorted((voc / "Annotations").glob("*.xml"))):
        img = voc / "JPEGImages" / f"{xml.stem}.jpg"
        r = parse_voc_xml(xml, img)
        images.append({"id": k, "file_name": str(img.resolve()), "width": r.width,
                       "height": r.height})
        for (x1, y1, x2, y2), name in zip(r.boxes.tolist(), r.names):
            anns.append({"id": len(anns), "image_id": k, "category_id": cats[name],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": 1.0, "iscrowd": 0})
    path = tmp / "labels.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": i, "name": c} for c, i in cats.items()]}))
    return path


def test_named_clusters_become_task_3(two_task_run, toy_root, tmp_path, capsys):
    run, _ = two_task_run
    labels = _labels(tmp_path, toy_root)
    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump(NEW))
    argv = ["add-task", "--run", run, "--labels", labels, "--names", names, *TINY]
    assert main([str(a) for a in argv]) == 0
    assert "t3 ft" in capsys.readouterr().out

    grown = yaml.safe_load((run / "classes.yaml").read_text())
    assert grown["tasks"][:2] == [list(TOY_TASKS[0]), list(TOY_TASKS[1])]
    assert grown["tasks"][2] == ["spiral", "bolt"]
    assert "hourglass" in grown["never_introduced"] and "bolt" not in grown["never_introduced"]

    data = run / "t3_data"
    train_ids = (data / "ImageSets" / "Main" / "t3_train.txt").read_text().split()
    labelled = {p.stem for p in (labels / "Annotations").glob("*.xml")
                if {"cluster_00", "cluster_01"} & set(parse_voc_xml(p, p).names)}
    assert set(train_ids) == labelled and labelled
    split3 = load_task_split(data / "classes.yaml")
    exemplars = set((run / "t2_ft" / "exemplars.txt").read_text().split())
    for i in train_ids:
        r = parse_voc_xml(data / "Annotations" / f"{i}.xml", data / "JPEGImages" / f"{i}.jpg")
        allowed = {"spiral", "bolt"} | (set(split3.seen(2)) if i in exemplars else set())
        assert set(r.names) <= allowed and {"spiral", "bolt"} & set(r.names)
        # The same pixels as the original image.
        assert (data / "JPEGImages" / f"{i}.jpg").resolve() == \
            (toy_root / "JPEGImages" / f"{i}.jpg").resolve()
    for i in exemplars - set(train_ids):  # old exemplars: only the classes known then
        r = parse_voc_xml(data / "Annotations" / f"{i}.xml", data / "JPEGImages" / f"{i}.jpg")
        assert set(r.names) <= set(split3.seen(2))
    test_ids = (toy_root / "ImageSets" / "Main" / "all_task_test.txt").read_text().split()
    assert (data / "ImageSets" / "Main" / "all_task_test.txt").read_text().split() == test_ids
    assert (data / "Annotations" / f"{test_ids[0]}.xml").resolve() == \
        (toy_root / "Annotations" / f"{test_ids[0]}.xml").resolve()

    ft_ckpt = torch.load(run / "t3_ft" / "model_final.pth", weights_only=True)
    assert ft_ckpt["meta"]["classes"][-2:] == ["spiral", "bolt"]
    ex3 = (run / "t3_ft" / "exemplars.txt").read_text().split()
    assert set(ex3) & set(train_ids)  # the finetune sees the new classes too
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary) == ["t1", "t2", "t3"]

    # Run again: everything is there, nothing is trained again.
    stamp = (run / "t3_ft" / "model_final.pth").stat().st_mtime_ns
    assert main([str(a) for a in argv]) == 0
    assert (run / "t3_ft" / "model_final.pth").stat().st_mtime_ns == stamp
    assert not (run / "t4_data").exists()

    # The COCO export of the same labels makes the same training data.
    coco = _coco(labels, tmp_path)
    from ore.engine.add_task import named, read_labels, read_names

    split2 = load_task_split(two_task_run[1])
    for source in (labels, coco):
        recs = named(read_labels(source), read_names(names, read_labels(source), split2))
        got = sorted((r.image_id, tuple(r.names), tuple(np.rint(r.boxes).ravel().tolist()))
                     for r in recs)
        if source == labels:
            want = got
        assert got == want


def test_bad_labels_and_names_are_one_line_before_any_work(two_task_run, toy_root, tmp_path,
                                                           capsys):
    run, _ = two_task_run
    labels = _labels(tmp_path, toy_root)

    def names(mapping) -> Path:
        p = tmp_path / f"n{len(list(tmp_path.glob('n*.yaml')))}.yaml"
        p.write_text(yaml.safe_dump(mapping))
        return p

    def err(labels_path, names_path, run_dir=run) -> str:
        return user_error(capsys, ["add-task", "--run", run_dir, "--labels", labels_path,
                                   "--names", names_path])

    before = sorted(p.name for p in run.iterdir())
    assert "'circle' is already a class (task 1)" in err(labels, names({"cluster_00": "circle"}))
    assert "'cluster_09' labels no object" in err(labels, names({"cluster_09": "fox"}))
    assert "nothing to learn" in err(labels, names({"cluster_00": "ignore"}))
    assert "'unknown' is reserved" in err(labels, names({"cluster_00": "unknown"}))
    assert "expected a mapping" in err(labels, names(["spiral"]))
    assert "expected a VOC folder" in err(tmp_path / "nope", names(NEW))
    assert "no Annotations/ folder" in err(tmp_path, names(NEW))
    assert "expected an `ore run-tasks` output folder" in err(labels, names(NEW), tmp_path)
    # A labelled test image would leak into the evaluation.
    test_id = (toy_root / "ImageSets" / "Main" / "all_task_test.txt").read_text().split()[0]
    leak = tmp_path / "leak"
    (leak / "Annotations").mkdir(parents=True)
    (leak / "JPEGImages").mkdir()
    r = parse_voc_xml(toy_root / "Annotations" / f"{test_id}.xml",
                      toy_root / "JPEGImages" / f"{test_id}.jpg")
    r = r.select(np.arange(len(r.names)) == 0)
    r.names = ["cluster_00"]
    (leak / "Annotations" / f"{test_id}.xml").write_text(voc_xml(r))
    os.symlink(Path(r.file_name).resolve(), leak / "JPEGImages" / f"{test_id}.jpg")
    assert "would leak into the evaluation" in err(leak, names({"cluster_00": "hourglass"}))
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_an_added_task_interrupted_before_its_first_weights_resumes(two_task_run, toy_root,
                                                                      tmp_path, monkeypatch):
    from ore.engine import tasks
    from ore.engine.add_task import add_task, branch_run

    source, _ = two_task_run
    run = branch_run(source, tmp_path / "branch")
    summary = json.loads((run / "summary.json").read_text())
    for t in [k for k in summary if k not in ("t1", "t2")]:  # back to two tasks
        del summary[t]
        for stage in ("train", "ft", "data"):
            if (run / f"{t}_{stage}").is_symlink():
                (run / f"{t}_{stage}").unlink()
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "classes.yaml").unlink(missing_ok=True)
    labels = _labels(tmp_path, toy_root)
    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump(NEW))

    class Interrupted(Exception):
        pass

    class StopsAtStart(tasks.Trainer):
        def run(self):  # writes the stage's config, as training starts, then stops
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(config_to_yaml(self.cfg))
            raise Interrupted

    monkeypatch.setattr(tasks, "Trainer", StopsAtStart)
    with pytest.raises(Interrupted):
        add_task(run, labels, names, TINY, evaluate=False)
    assert (run / "t3_train" / "config.yaml").is_file()
    assert not (run / "t3_train" / "model_final.pth").exists()
    monkeypatch.undo()
    add_task(run, labels, names, TINY, evaluate=False)  # resumes task 3, adds no task 4
    assert (run / "t3_ft" / "model_final.pth").is_file() and not (run / "t4_data").exists()
    assert json.loads((source / "summary.json").read_text()).keys() >= {"t1", "t2"}
