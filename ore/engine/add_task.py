"""``ore add-task``: learn labelled clusters of unknowns as the run's next task.

The labels (a VOC folder or a COCO JSON, as ``ore discover`` exports them and labelling
tools write them back) name objects by cluster (``cluster_03``); a names file maps each
cluster to a new class, or to ``ignore`` (its objects stay unknown, as does a cluster the
file leaves out). The run's class split gains one task with the new classes, and task
t + 1 is trained and finetuned by the same steps as every task of ``ore run-tasks``
(:func:`ore.engine.tasks.run_stages`), starting from task t's final model, then evaluated.

Task t + 1 reads a dataset folder of its own, ``<run>/t<N>_data`` (VOC layout, images and
unchanged annotations as symbolic links):

- ``t<N>_train``: the labelled images, their objects named by class (the images' other
  objects are not labelled, as in every task's training list);
- ``t<t>_exemplars``: task t's exemplar images with the annotations of the classes known
  then (an object of a class learnt now was not labelled at the time);
- the test list and the energy-fit list of the run, as they are.

``<run>/classes.yaml`` holds the run's class split with every task added so far, and
``<run>/t<N>_data/classes.yaml`` the split task N was trained with.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from ore.config import load_config
from ore.data.classes import UNKNOWN, TaskSplit, canonical_name, load_task_split
from ore.data.images import IMAGE_EXTENSIONS
from ore.data.records import (
    ImageRecord,
    find_image,
    list_path,
    parse_voc_xml,
    read_image_list,
    voc_xml,
)
from ore.engine.layout import CONFIG, FINAL, RunLayout, task_key
from ore.engine.tasks import plan_stage, run_stages, write_task_summary
from ore.errors import OreError
from ore.fileio import atomic_folder, atomic_write_text, folder_lock, read_json, read_yaml

log = logging.getLogger(__name__)

IGNORE = "ignore"
CLASSES_FILE = "classes.yaml"


@dataclass(frozen=True)
class NewTask:
    """What a names file makes of the labels: the new classes in order, and each
    cluster's class (None: stays unknown)."""

    classes: tuple[str, ...]
    of_cluster: dict[str, str | None]


# --- the labels -----------------------------------------------------------------------


def _voc_labels(folder: Path) -> list[ImageRecord]:
    ann, images = folder / "Annotations", folder / "JPEGImages"
    if not ann.is_dir():
        raise OreError(f"--labels {folder}: no Annotations/ folder (expected a VOC folder "
                       "with Annotations/ and JPEGImages/, or a COCO JSON file)")
    records = []
    for xml in sorted(ann.glob("*.xml")):
        found = [images / f"{xml.stem}{s}" for s in IMAGE_EXTENSIONS
                 if (images / f"{xml.stem}{s}").exists()]
        if not found:
            raise OreError(f"--labels {folder}: no image for {xml.name} in JPEGImages/")
        records.append(parse_voc_xml(xml, found[0].resolve()))
    return records


def _coco_labels(path: Path) -> list[ImageRecord]:
    data = read_json(path)
    try:
        cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(im["id"]): im for im in data["images"]}
        anns = data["annotations"]
        ids = np.array([int(a["image_id"]) for a in anns], np.int64)
        boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        names = [cats[int(a["category_id"])] for a in anns]
    except (KeyError, TypeError, ValueError) as exc:
        raise OreError(f"--labels {path}: not a COCO instances file ({exc!r}: expected "
                       "images, annotations with image_id, category_id, bbox, and "
                       "categories)") from None
    if not np.isfinite(boxes).all():
        raise OreError(f"--labels {path}: a bbox is not finite")
    unknown_images = sorted(set(ids.tolist()) - set(images))
    if unknown_images:
        raise OreError(f"--labels {path}: annotations of image ids not in 'images' "
                       f"({unknown_images[:3]})")
    corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    records = []
    for image_id, im in images.items():
        file = Path(str(im.get("file_name", "")))
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise OreError(f"--labels {path}: image {im.get('file_name')!r} not found "
                           f"(file_name is read relative to the JSON's folder)")
        pick = np.flatnonzero(ids == image_id)
        records.append(ImageRecord(
            image_id=file.stem, file_name=str(file.resolve()), width=int(im["width"]),
            height=int(im["height"]), boxes=corners[pick].astype(np.float32),
            names=[canonical_name(names[i]) for i in pick],
            difficult=np.zeros(len(pick), bool)))
    return records


def read_labels(path: str | Path) -> list[ImageRecord]:
    """Labelled images from a VOC folder or a COCO JSON file (names as written)."""
    path = Path(path)
    if path.is_dir():
        return _voc_labels(path)
    if path.suffix == ".json" and path.is_file():
        return _coco_labels(path)
    raise OreError(f"--labels {path}: expected a VOC folder (Annotations/, JPEGImages/) or "
                   "a COCO .json file")


def read_names(path: str | Path, labels: list[ImageRecord], split: TaskSplit) -> NewTask:
    """The names file: ``cluster: class`` (or ``ignore``) per line, checked against the
    labels (every named cluster labels some object) and the split (a new class may not
    exist already)."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise OreError(f"--names {path}: expected a mapping 'cluster_03: new_class' (or "
                       f"'{IGNORE}'), one line per cluster")
    present = {n for r in labels for n in r.names}
    of_cluster: dict[str, str | None] = {}
    classes: list[str] = []
    for cluster, name in data.items():
        if not isinstance(cluster, str) or not isinstance(name, str) or not name.strip():
            raise OreError(f"--names {path}: {cluster!r}: {name!r} is not 'cluster: class'")
        cluster = canonical_name(cluster)
        if cluster not in present:
            raise OreError(f"--names {path}: {cluster!r} labels no object in the labels "
                           f"(they name {sorted(present)[:6]})")
        new = canonical_name(name)
        if new == IGNORE:
            of_cluster[cluster] = None
            continue
        if new == UNKNOWN:
            raise OreError(f"--names {path}: {cluster}: {UNKNOWN!r} is reserved; write "
                           f"'{IGNORE}' to leave a cluster unknown")
        if new in split.classes:
            t = next(i for i in range(1, split.num_tasks + 1) if new in split.introduced(i))
            raise OreError(f"--names {path}: {cluster}: {new!r} is already a class (task "
                           f"{t}); a new task needs new class names")
        of_cluster[cluster] = new
        if new not in classes:
            classes.append(new)  # clusters given one name are merged into one class
    if not classes:
        raise OreError(f"--names {path}: every cluster is '{IGNORE}': nothing to learn")
    left = sorted(present - set(of_cluster))
    if left:
        log.info("left out of %s, so still unknown: %s", path, ", ".join(left))
    return NewTask(tuple(classes), of_cluster)


def named(records: list[ImageRecord], task: NewTask) -> list[ImageRecord]:
    """The labelled images with their objects renamed to classes (ignored clusters and
    clusters left out dropped; images left with no object dropped)."""
    out = []
    for r in records:
        new = [task.of_cluster.get(n) for n in r.names]
        keep = np.array([n is not None for n in new], bool)
        if keep.any():
            out.append(replace(r.select(keep), names=[n for n in new if n is not None]))
    return out


# --- the run --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTask:
    """The last task of a run-tasks folder: its number, stage configs and final weights."""

    task: int
    train_config: Path
    ft_config: Path | None
    final: Path
    exemplars: Path | None


def last_task(run: RunLayout, before: int | None = None) -> RunTask:
    """The run's last task with a training config (or the last one before ``before``).
    An added task whose training was interrupted before it wrote any weights does not
    count: adding it again resumes it."""
    if not run.root.is_dir():
        raise OreError(f"--run {run.root}: not a folder")
    t = 0
    while (run.stage_dir(t + 1, "train") / CONFIG).is_file() and (before is None
                                                                   or t + 1 < before):
        if (run.root / f"t{t + 1}_data").is_dir() and run.find_weights(t + 1) is None:
            break
        t += 1
    if t == 0:
        raise OreError(f"--run {run.root}: no t1_train/{CONFIG}: expected an `ore run-tasks` "
                       "output folder")
    ft = run.stage_dir(t, "ft") / CONFIG
    final = run.find_weights(t)
    if final is None:
        raise OreError(f"--run {run.root}: task {t} has no {FINAL} yet (finish it with "
                       "`ore run-tasks` first)")
    ft_done = ft.is_file() and final.parent == ft.parent
    exemplars = run.exemplar_list(t) if ft_done and run.exemplar_list(t).is_file() else None
    return RunTask(t, run.stage_dir(t, "train") / CONFIG, ft if ft_done else None, final,
                   exemplars)


def _link(src: Path, dst: Path) -> None:
    os.symlink(src.resolve(), dst)


def _image_file(root: Path, image_dir: str, image_id: str) -> Path:
    return find_image(root / image_dir, image_id)


def build_task_data(folder: Path, cfg, old: TaskSplit, new: TaskSplit, prev: RunTask,
                    labelled: list[ImageRecord]) -> tuple[str, str | None]:
    """Write the dataset folder of the new task (module docstring); returns the names of
    its training list and of the previous exemplar list (None without one)."""
    d = cfg.DATASETS
    if d.FORMAT != "voc":
        raise OreError(f"DATASETS.FORMAT={d.FORMAT}: add-task reads and writes VOC folders "
                       "(DATASETS.FORMAT=voc)")
    root = Path(d.ROOT)
    n, t = new.num_tasks, prev.task
    train_list, ex_list = f"t{n}_train", f"t{t}_exemplars" if prev.exemplars else None
    kept = set(old.seen(t))
    shared = [d.TEST] + ([cfg.EBUI.FIT_SPLIT] if cfg.EBUI.RUN_TASKS else [])
    shared_ids = {name: read_image_list(list_path(root, name)) for name in dict.fromkeys(shared)}
    ex_ids = read_image_list(prev.exemplars) if prev.exemplars else []
    held_out = {i for ids in shared_ids.values() for i in ids}
    by_id: dict[str, ImageRecord] = {}
    for i in ex_ids:
        r = parse_voc_xml(root / "Annotations" / f"{i}.xml", _image_file(root, d.IMAGE_DIR, i))
        by_id[i] = r.select(np.array([name in kept for name in r.names], bool))
    train_ids = []
    for r in labelled:
        image = str(Path(r.file_name).resolve())
        i, k = r.image_id, 1
        while i in by_id and str(Path(by_id[i].file_name).resolve()) != image:
            i, k = f"{r.image_id}_{k}", k + 1
        if i in held_out and str(_image_file(root, d.IMAGE_DIR, i).resolve()) == image:
            raise OreError(f"labelled image {r.file_name} is in the run's {' or '.join(shared)}"
                           " list: learning it would leak into the evaluation")
        if i in by_id:  # an exemplar image: its known objects and the new ones
            old_r = by_id[i]
            r = replace(old_r, boxes=np.concatenate([old_r.boxes, r.boxes]),
                        names=[*old_r.names, *r.names],
                        difficult=np.concatenate([old_r.difficult, r.difficult]))
        by_id[i] = replace(r, image_id=i)
        if i not in train_ids:
            train_ids.append(i)
    with atomic_folder(folder) as tmp:
        (tmp / "Annotations").mkdir()
        (tmp / "JPEGImages").mkdir()
        (tmp / "ImageSets" / "Main").mkdir(parents=True)
        for i, r in by_id.items():
            (tmp / "Annotations" / f"{i}.xml").write_text(voc_xml(r))
            _link(Path(r.file_name), tmp / "JPEGImages" / f"{i}{Path(r.file_name).suffix}")
        for name, ids in shared_ids.items():
            for i in ids:
                if i in by_id:
                    raise OreError(f"image id {i!r} is both in {name} and in the training "
                                   "data of the new task")
                if not (tmp / "Annotations" / f"{i}.xml").exists():
                    _link(root / "Annotations" / f"{i}.xml", tmp / "Annotations" / f"{i}.xml")
                    src = _image_file(root, d.IMAGE_DIR, i)
                    _link(src, tmp / "JPEGImages" / f"{i}{src.suffix}")
            (tmp / "ImageSets" / "Main" / f"{Path(name).stem}.txt").write_text(
                "".join(f"{i}\n" for i in ids))
        lists = {train_list: train_ids, **({ex_list: ex_ids} if ex_list else {})}
        for name, ids in lists.items():
            (tmp / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
        (tmp / CLASSES_FILE).write_text(split_yaml(new))
    return train_list, ex_list


def split_yaml(split: TaskSplit) -> str:
    data = {"tasks": [list(t) for t in split.tasks]}
    if split.never_introduced:
        data["never_introduced"] = list(split.never_introduced)
    return yaml.safe_dump(data, sort_keys=False)


def branch_run(source: str | Path, target: str | Path) -> Path:
    """A run folder ``target`` that shares the finished tasks of ``source``: each stage and
    task-data folder linked, the summary and class split copied. :func:`add_task` on it
    writes only into ``target`` (new stage folders, the summary, the split), so ``source``
    stays as it was; a second call on the same pair leaves ``target`` as it is."""
    source, target = Path(source).resolve(), Path(target)
    run = RunLayout(source)
    if not run.summary_file.is_file():
        raise OreError(f"{source}: no {run.summary_file.name}: expected a finished "
                       "`ore run-tasks` folder")
    if target.exists():
        linked = target / run.summary_file.name
        if linked.is_file() and all((target / p.name).exists() for p in source.iterdir()
                                    if not p.name.startswith(".")):
            return target
        raise OreError(f"{target} exists and is not a branch of {source}")
    with atomic_folder(target) as tmp:
        for entry in sorted(source.iterdir()):
            if entry.name.startswith("."):  # locks
                continue
            if entry.is_dir():
                _link(entry, tmp / entry.name)
            else:
                (tmp / entry.name).write_bytes(entry.read_bytes())
    return target


def add_task(run_dir: str | Path, labels: str | Path, names: str | Path,
             overrides: list[str] = (), evaluate: bool = True) -> dict:
    """Learn the named clusters of ``labels`` as the next task of the run in ``run_dir``;
    returns the run's summary with the new task (see :func:`ore.engine.tasks.run_tasks`).
    Rerunning with the same inputs resumes; every input is checked before any work."""
    run = RunLayout(Path(run_dir))
    prev = last_task(run)
    records = read_labels(labels)
    added = run.root / f"t{prev.task}_data" / CLASSES_FILE
    if added.is_file():  # the last task was added: is this the same one again?
        earlier = last_task(run, before=prev.task)
        before = load_task_split(load_config(earlier.train_config).DATASETS.CLASSES)
        if read_names(names, records, before).classes == load_task_split(added).tasks[-1]:
            prev = earlier  # rerun: resume it (what is done is skipped)
        elif task_key(prev.task) not in (run.load_summary() if run.summary_file.is_file()
                                         else {}):
            raise OreError(f"{added.parent}: task {prev.task}, added with other names, did not "
                           "finish; run add-task again with its labels and names first")
    base = load_config(prev.train_config)
    old = load_task_split(base.DATASETS.CLASSES)
    task = read_names(names, records, old)
    labelled = named(records, task)
    n = prev.task + 1
    if old.num_tasks != prev.task:
        raise OreError(f"--run {run.root}: its class split {old.name} has {old.num_tasks} tasks "
                       f"but task {prev.task} is the last one trained")
    new = TaskSplit(str(run.root / f"t{n}_data" / CLASSES_FILE), (*old.tasks, task.classes),
                    tuple(c for c in old.never_introduced if c not in task.classes))
    data = run.root / f"t{n}_data"
    if data.exists():
        existing = read_yaml(data / CLASSES_FILE) if (data / CLASSES_FILE).is_file() else None
        if existing != yaml.safe_load(split_yaml(new)):
            raise OreError(f"{data} holds another added task (its {CLASSES_FILE} differs); "
                           "remove it by hand to add this one")
        train_list = f"t{n}_train"
        ex_list = f"t{prev.task}_exemplars" if prev.exemplars else None
    else:
        train_list, ex_list = build_task_data(data, base, old, new, prev, labelled)
    common = [f"OWOD.TASK={n}", f"DATASETS.CLASSES={data / CLASSES_FILE}",
              f"DATASETS.ROOT={data}", "EBUI.ENABLED=false", *overrides]
    train = plan_stage(prev.train_config, n, run.stage_dir(n, "train"),
                       [*common, f"DATASETS.TRAIN={train_list}", f"MODEL.WEIGHTS={prev.final}",
                        f"OUTPUT_DIR={run.stage_dir(n, 'train')}"])
    ft = None
    if prev.ft_config is not None:
        sources = [s for s in (ex_list, train_list) if s]
        ft = plan_stage(prev.ft_config, n, run.stage_dir(n, "ft"),
                        [*common, f"MODEL.WEIGHTS={train.folder / FINAL}",
                         f"EXEMPLARS.SOURCES=[{','.join(sources)}]",
                         f"DATASETS.TRAIN={train_list}", f"OUTPUT_DIR={run.stage_dir(n, 'ft')}"],
                        exemplar_list=run.exemplar_list(n))
    with folder_lock(run.root, "--run"):
        summary = run_stages(run, [(n, train, ft)], evaluate)
        atomic_write_text(run.root / CLASSES_FILE, split_yaml(new))
        return write_task_summary(run, task_key(n), summary[task_key(n)])
