#!/usr/bin/env python
"""Convert COCO instances JSON into the VOC/OWOD layout with task lists (SPEC §4).

For users without the public OWOD lists::

    python datasets/prepare_owod.py \\
        --train-json coco/annotations/instances_train2017.json --train-images coco/train2017 \\
        --test-json coco/annotations/instances_val2017.json --test-images coco/val2017 \\
        --out datasets/OWOD [--classes owod|sowod|FILE.yaml] [--per-class 50] [--copy]

Writes into ``--out`` (which must not exist or be empty; written in a temporary folder
beside it and renamed at the end, so a failed run leaves nothing half-made):

- ``Annotations/<id>.xml``: VOC XML (size; per object its name in VOC spelling,
  ``difficult`` = COCO ``iscrowd``, and a 1-based inclusive ``bndbox``: ``xmin = x + 1``,
  ``ymin = y + 1``, ``xmax = x + w``, ``ymax = y + h``, rounded, clipped to the image);
- ``JPEGImages/<id>.<ext>``: symbolic links to the images (``--copy`` copies them);
- ``ImageSets/Main/``:
  ``tN_train``: the training images that contain an object of task N's classes, each image
  in exactly one list: **the earliest task whose classes it contains** (its objects of
  later tasks stay unlabelled background there, as future classes are in the benchmark;
  training images with no object of any task are left out);
  ``tN_ft`` (N ≥ 2): a balanced exemplar set, ``--per-class`` images per class seen by
  task N, drawn from ``t1_train … tN_train`` (``ore.data.exemplars.select_exemplars``);
  ``all_task_test``: every image of ``--test-json``.

The public M-OWODB lists of the ORE paper were made by their authors from VOC 2007/2012
and COCO 2017 by another rule, so numbers on these lists are not comparable with
published ones; use the public lists for that.

Image ids are the image file names without extension; they must be unique across both
JSON files. User mistakes print one line ``error: …`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from xml.sax.saxutils import escape

try:
    import ore  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ore.data.classes import TaskSplit, load_task_split
from ore.data.exemplars import select_exemplars
from ore.data.records import VOC_IMAGE_EXTENSIONS, ImageRecord, load_coco_json
from ore.errors import OreError
from ore.fileio import atomic_folder

log = logging.getLogger("prepare_owod")



def voc_box(box) -> tuple[int, int, int, int]:
    """A record's box (already VOC 1-based inclusive) rounded to whole pixels."""
    return tuple(int(round(float(v))) for v in box)


def voc_xml(record: ImageRecord, file_name: str) -> str:
    """The VOC annotation of one image."""
    objects = []
    for box, name, difficult in zip(record.boxes, record.names, record.difficult):
        xmin, ymin, xmax, ymax = voc_box(box)
        objects.append(
            "  <object>\n"
            f"    <name>{escape(name)}</name>\n"
            "    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n"
            f"    <difficult>{int(bool(difficult))}</difficult>\n"
            f"    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
            f"<ymax>{ymax}</ymax></bndbox>\n"
            "  </object>\n"
        )
    return (
        "<annotation>\n  <folder>JPEGImages</folder>\n"
        f"  <filename>{escape(file_name)}</filename>\n"
        f"  <size><width>{record.width}</width><height>{record.height}</height>"
        "<depth>3</depth></size>\n"
        + "".join(objects) + "</annotation>\n"
    )


def assign_tasks(records: list[ImageRecord], split: TaskSplit) -> dict[int, list[ImageRecord]]:
    """``{task: records}``: each image in the earliest task whose classes it contains."""
    task_of = {c: t for t in range(1, split.num_tasks + 1) for c in split.introduced(t)}
    lists: dict[int, list[ImageRecord]] = {t: [] for t in range(1, split.num_tasks + 1)}
    for r in records:
        tasks = [task_of[n] for n in r.names if n in task_of]
        if tasks:
            lists[min(tasks)].append(r)
    return lists


def _check_ids(records: list[ImageRecord], source: str, taken: dict[str, str]) -> None:
    for r in records:
        if r.image_id in taken:
            raise OreError(f"image id {r.image_id!r} (from {source}) is also in "
                           f"{taken[r.image_id]}; image file names must be unique across both "
                           "JSON files")
        if Path(r.file_name).suffix.lower() not in VOC_IMAGE_EXTENSIONS:
            raise OreError(f"{r.file_name}: unsupported image type; expected one of "
                           f"{', '.join(VOC_IMAGE_EXTENSIONS)}")
        taken[r.image_id] = source


def _place_image(src: Path, dst: Path, copy: bool) -> None:
    if copy:
        shutil.copyfile(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def prepare(train_json, train_images, test_json, test_images, out, *, classes="owod",
            per_class: int = 50, copy: bool = False, seed: int = 0) -> dict[str, int]:
    """Write the OWOD layout to ``out``; returns the number of ids in each list written."""
    if per_class < 1:
        raise OreError(f"--per-class {per_class} must be ≥ 1")
    split = load_task_split(classes)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OreError(f"{out} exists and is not an empty folder; choose another --out")
    train = load_coco_json(train_json, train_images, split)
    test = load_coco_json(test_json, test_images, split)
    taken: dict[str, str] = {}
    _check_ids(train, str(train_json), taken)
    _check_ids(test, str(test_json), taken)

    by_task = assign_tasks(train, split)
    lists: dict[str, list[str]] = {}
    for t in range(1, split.num_tasks + 1):
        lists[f"t{t}_train"] = [r.image_id for r in by_task[t]]
        if not by_task[t]:
            log.warning("t%d_train is empty: no training image has a class of task %d", t, t)
    for t in range(2, split.num_tasks + 1):
        pool = [r for k in range(1, t + 1) for r in by_task[k]]
        lists[f"t{t}_ft"] = select_exemplars(pool, split, t, per_class, seed=seed)
    lists["all_task_test"] = [r.image_id for r in test]
    unused = len(train) - sum(len(v) for v in by_task.values())
    if unused:
        log.info("%d training images have no object of any task and are left out", unused)

    try:
        with atomic_folder(out) as tmp:  # out is new or empty (checked above)
            for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
                (tmp / sub).mkdir(parents=True)
            for r in [r for rs in by_task.values() for r in rs] + test:
                src = Path(r.file_name)
                name = r.image_id + src.suffix.lower()
                (tmp / "Annotations" / f"{r.image_id}.xml").write_text(voc_xml(r, name))
                _place_image(src, tmp / "JPEGImages" / name, copy)
            for name, ids in lists.items():
                (tmp / "ImageSets" / "Main" / f"{name}.txt").write_text(
                    "".join(i + "\n" for i in ids))
    except OSError as exc:  # a full disk, a filesystem without links, a read-only folder
        raise OreError(f"cannot write {out}: {exc}") from None
    return {name: len(ids) for name, ids in lists.items()}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="prepare_owod.py",
                        description="COCO instances JSON → VOC/OWOD layout with task lists.")
    p.add_argument("--train-json", required=True, help="COCO instances JSON of the train set")
    p.add_argument("--train-images", required=True, help="image folder of the train set")
    p.add_argument("--test-json", required=True, help="COCO instances JSON of the test set")
    p.add_argument("--test-images", required=True, help="image folder of the test set")
    p.add_argument("--out", required=True, help="dataset root to write (new or empty)")
    p.add_argument("--classes", default="owod", help="owod, sowod or a class-split YAML file")
    p.add_argument("--per-class", type=int, default=50,
                   help="exemplar images per seen class in tN_ft (default 50)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--copy", action="store_true", help="copy images into JPEGImages/")
    how.add_argument("--symlink", action="store_true", help="link images (the default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the exemplar choice")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        counts = prepare(args.train_json, args.train_images, args.test_json, args.test_images,
                         args.out, classes=args.classes, per_class=args.per_class,
                         copy=args.copy, seed=args.seed)
    except OreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for name, n in counts.items():
        print(f"{name:>14}: {n} images")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
