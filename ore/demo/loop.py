"""The open-world loop, after the last task: discover the unknowns, name them, learn them.

1. ``ore discover`` over the training images of every task with the run's final model
   (EBUI on, the whole-object score on): the unknown detections clustered, a gallery, and
   each cluster named by the majority ground-truth class of the crops its gallery row
   shows (``ignore`` for ``none`` and for a class the run knows), as a person reviewing
   the gallery would name it;
2. task t + 1 learnt by ``ore add-task`` from those clusters, on a branch of the run;
3. the same task learnt from the ground-truth boxes of the never-introduced classes in the
   same images (the reference), on a second branch, side by side with 2.

The run itself is never changed: each branch links its finished tasks
(:func:`ore.engine.add_task.branch_run`). Everything lands in ``<output>/loop/`` and a
finished step is kept, so a rerun resumes. :func:`loop_figures` makes the numbers of the
report: purity, coverage, the new classes' AP50 and the old classes' mAP before and after.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ore.data.classes import TaskSplit, load_task_split
from ore.data.records import find_image, list_path, parse_voc_xml, read_image_list, voc_xml
from ore.demo.workers import Job, run_side_by_side
from ore.engine.add_task import add_task, branch_run, read_labels, read_names
from ore.engine.discover import GALLERY_PNG, IGNORE, NAMES_FILE, PURITY_FILE, VOC_DIR, discover
from ore.engine.inference import Predictor
from ore.engine.layout import RunLayout, final_metrics, find_run_stage, stage_config, task_key
from ore.engine.objectness import STEPS as OBJECTNESS_STEPS
from ore.engine.objectness import run_training_records
from ore.errors import OreError
from ore.fileio import atomic_folder, read_json, read_yaml

LOOP_DIR = "loop"
DISCOVER_DIR = "discover"
GT_LABELS_DIR = "ground-truth-labels"
BRANCHES = {"discovered": "t{n}-discovered", "ground_truth": "t{n}-ground-truth"}


def branch_dir(loop: Path, name: str, n: int) -> Path:
    """The run folder of the branch ``name`` (a key of :data:`BRANCHES`) for task ``n``."""
    return loop / BRANCHES[name].format(n=n)
# How discover runs here (README, discovering new classes, has the measurements): unknown
# detections from score 0.05 whose whole-object score reaches 0.7, in 40 clusters (k by
# silhouette on the quick world, which has too few), each named by the majority class of
# the crops its gallery row shows, as a person reviewing the gallery would name it; named
# by all of its members instead, no cluster of the toy world gets a new class's name.
DISCOVER_SCORE = 0.05
OBJECTNESS = 0.7
CLUSTERS = 40
NAMES_FROM = "gallery"
QUICK_OBJECTNESS_STEPS = 300  # the quick demo is a smoke test
# Targets of the loop on the toy world.
PURITY_MIN = 0.85
COVERAGE_MIN = 0.60
NEW_AP50_RATIO_MIN = 0.80  # new classes' AP50 from discovered labels / from ground truth
OLD_MAP_KEPT_MIN = 0.90  # old classes' mAP after task t + 1 / their mAP after task t


def training_images(world: Path, split: TaskSplit) -> list[Path]:
    """The images of the training lists ``t1_train`` … ``tT_train`` of a toy world, each
    once, in list order."""
    ids = []
    for t in range(1, split.num_tasks + 1):
        ids += read_image_list(list_path(world, f"t{t}_train"))
    return [find_image(world / "JPEGImages", i) for i in dict.fromkeys(ids)]


def ground_truth_labels(world: Path, images: list[Path], classes: tuple[str, ...],
                        folder: Path) -> Path:
    """A VOC labels folder (``Annotations/``, ``JPEGImages/`` linked) holding the
    ground-truth objects of ``classes`` in ``images``, and ``names.yaml`` naming each class
    as itself: what ``ore add-task`` learns when a person draws every box."""
    if (folder / NAMES_FILE).is_file():
        return folder
    with atomic_folder(folder) as tmp:
        (tmp / "Annotations").mkdir()
        (tmp / "JPEGImages").mkdir()
        for p in images:
            r = parse_voc_xml(world / "Annotations" / f"{p.stem}.xml", p)
            keep = np.array([n in classes for n in r.names], bool)
            if keep.any():
                (tmp / "Annotations" / f"{p.stem}.xml").write_text(voc_xml(r.select(keep)))
                os.symlink(p.resolve(), tmp / "JPEGImages" / p.name)
        (tmp / NAMES_FILE).write_text("".join(f"{c}: {c}\n" for c in classes))
    return folder


def _discover(run: Path, world: Path, images: list[Path], folder: Path, seed: int,
              quick: bool) -> dict:
    """discover's summary (read back when it finished before), or ``{"error": line}``."""
    if (folder / PURITY_FILE).is_file():
        return {"purity": read_json(folder / PURITY_FILE)}
    try:
        stage = find_run_stage(run)
        cfg = stage_config(stage)
        predictor = Predictor(cfg, str(stage.weights), DISCOVER_SCORE)
        return discover(predictor, images, folder, seed=seed, ground_truth_root=world,
                        k=None if quick else CLUSTERS, objectness=OBJECTNESS,
                        objectness_records=run_training_records(run, cfg.OWOD.TASK),
                        objectness_steps=QUICK_OBJECTNESS_STEPS if quick else OBJECTNESS_STEPS,
                        names_from=NAMES_FROM)
    except OreError as exc:  # e.g. no unknown detection at all: the report says so
        return {"error": str(exc)}


def run_loop(out: Path, ore_run: Path, world: Path, *, seed: int, quick: bool = False) -> dict:
    """Steps 1–3 of the module docstring; returns :func:`loop_figures`' dict."""
    loop = out / LOOP_DIR
    split = load_task_split(world / "classes.yaml")
    n = split.num_tasks + 1
    images = training_images(world, split)
    found = _discover(ore_run, world, images, loop / DISCOVER_DIR, seed, quick)
    gt = ground_truth_labels(world, images, split.never_introduced, loop / GT_LABELS_DIR)
    labels, skipped = {}, {}
    if any((gt / "Annotations").iterdir()):
        labels["ground_truth"] = (gt, gt / NAMES_FILE)
    else:
        skipped["ground_truth"] = (f"no object of {', '.join(split.never_introduced)} in the "
                                   "training images")
    if "error" in found:
        skipped["discovered"] = found["error"]
    else:
        voc, names = loop / DISCOVER_DIR / VOC_DIR, loop / DISCOVER_DIR / NAMES_FILE
        named = {v for v in (read_yaml(names) or {}).values()} - {IGNORE}
        if not named:
            skipped["discovered"] = ("no cluster's majority is a never-introduced class, so "
                                     "every cluster is named ignore")
        else:
            read_names(names, read_labels(voc), split)  # checked before any training
            labels["discovered"] = (voc, names)
    jobs = {}
    for name, (voc, names) in labels.items():
        branch = branch_run(ore_run, branch_dir(loop, name, n))
        if task_key(n) in RunLayout(branch).load_summary():
            continue
        jobs[name] = Job(add_task, str(branch.with_name(branch.name + ".log")),
                         dict(run_dir=str(branch), labels=str(voc), names=str(names),
                              overrides=["DATALOADER.NUM_WORKERS=0", f"SEED={seed}"]))
    if jobs:
        with tqdm(desc=f"learning task {n} ({', '.join(jobs)})", dynamic_ncols=True,
                  bar_format="{desc}: {elapsed}") as bar:
            run_side_by_side(jobs, bar.refresh)
    return loop_figures(loop, ore_run, split, found, skipped)


def loop_figures(loop: Path, ore_run: Path, split: TaskSplit, found: dict,
                 skipped: dict[str, str]) -> dict:
    """The loop's figures: discovery (clusters, purity, coverage of each never-introduced
    class) and per branch the new classes' AP50 and the old classes' mAP after task t + 1,
    against task t's known mAP; the targets with their values."""
    n = split.num_tasks + 1
    novel = list(split.never_introduced)
    before = final_metrics(RunLayout(ore_run).load_summary().get(task_key(n - 1)))
    old_before = None if before is None else before.get("known_mAP_both")
    folder = loop / DISCOVER_DIR
    result: dict = {"task": n, "new_classes": novel, "old_mAP_before": old_before,
                    "score_thresh": DISCOVER_SCORE, "objectness": OBJECTNESS,
                    "names_from": NAMES_FROM,
                    "discover": {"folder": str(folder), "gallery": str(folder / GALLERY_PNG)},
                    "tasks": {}}
    if "error" in found:
        result["discover"]["error"] = found["error"]
    purity = found.get("purity")
    if purity is not None:
        cov = purity["coverage"]
        objects = sum(cov[c]["objects"] for c in novel if c in cov)
        covered = sum(cov[c]["covered"] for c in novel if c in cov)
        result["discover"].update(
            members=purity["members"], k=len(purity["clusters"]),
            purity=purity["overall_purity"],
            coverage={c: cov[c]["coverage"] if c in cov else None for c in novel},
            coverage_all=covered / objects if objects else None,
            majorities=[c["majority"] for c in purity["clusters"]])
        names_file = folder / NAMES_FILE
        if names_file.is_file():
            by_cluster = read_yaml(names_file) or {}
            given = list(by_cluster.values())
            result["discover"]["names"] = {v: given.count(v) for v in sorted(set(given))}
            result["discover"]["named_clusters"] = [
                (int(c.rsplit("_", 1)[1]), v) for c, v in by_cluster.items() if v != IGNORE]
    for name in BRANCHES:
        if name in skipped:
            result["tasks"][name] = {"skipped": skipped[name]}
            continue
        metrics = final_metrics(RunLayout(branch_dir(loop, name, n)).load_summary()
                                .get(task_key(n)))
        if metrics is None:
            result["tasks"][name] = {"skipped": "the task did not finish"}
            continue
        ap = metrics.get("per_class_ap") or {}
        learnt = [ap.get(c) for c in novel]
        result["tasks"][name] = {
            "new_AP50": {c: v for c, v in zip(novel, learnt)},
            "new_mAP50": (float(np.mean([v if v is not None else 0.0 for v in learnt]))),
            "old_mAP_after": metrics.get("known_mAP_prev"),
            "unknown_recall": metrics.get("unknown_recall")}
    result["targets"] = loop_targets(result)
    return result


def _ratio(a, b):
    return None if a is None or not b else a / b


def loop_targets(r: dict) -> dict:
    """``purity`` ≥ 85%, ``coverage`` ≥ 60% of the never-introduced objects, the new
    classes' AP50 from discovered labels ≥ 80% of that from ground truth, and the old
    classes' mAP after the new task (discovered labels) ≥ 90% of before. A figure that
    could not be measured fails (``value`` None)."""
    d = r["discover"]
    disc, gt = r["tasks"].get("discovered", {}), r["tasks"].get("ground_truth", {})

    def target(value, minimum):
        return {"value": value, "min": minimum,
                "pass": value is not None and value >= minimum}

    return {"purity": target(d.get("purity"), PURITY_MIN),
            "coverage": target(d.get("coverage_all"), COVERAGE_MIN),
            "new_ap50_ratio": target(_ratio(disc.get("new_mAP50"), gt.get("new_mAP50")),
                                     NEW_AP50_RATIO_MIN),
            "old_map_kept": target(_ratio(disc.get("old_mAP_after"), r["old_mAP_before"]),
                                   OLD_MAP_KEPT_MIN)}
