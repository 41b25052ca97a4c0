"""Balanced exemplar sets for the finetune after each task (SPEC §3.4).

For every class seen so far, up to N training images that contain it, chosen
deterministically: the seen training images are visited in a seeded order and an image is
taken when any of its seen classes still has fewer than N images. Each taken image counts
for every seen class in it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ore.data.classes import TaskSplit
from ore.data.records import ImageRecord


def select_exemplars(
    records: list[ImageRecord], split: TaskSplit, task: int, per_class: int, seed: int = 0
) -> list[str]:
    """Image ids of a balanced exemplar set over ``split.seen(task)``, in visiting order.

    ``records`` are the candidate training images (any role; names as annotated). An id
    listed twice is considered once.
    """
    seen = set(split.seen(task))
    count = dict.fromkeys(split.seen(task), 0)
    unique = list({r.image_id: r for r in records}.values())
    order = np.random.default_rng(seed).permutation(len(unique))
    chosen = []
    for i in order:
        classes = {n for n in unique[i].names if n in seen}
        if any(count[c] < per_class for c in classes):
            chosen.append(unique[i].image_id)
            for c in classes:
                count[c] += 1
    return chosen


def exemplar_sources(cfg) -> list[str]:
    """Lists to draw from: ``EXEMPLARS.SOURCES``, or ``t1_train … t<TASK>_train``."""
    return list(cfg.EXEMPLARS.SOURCES) or [f"t{t}_train" for t in range(1, cfg.OWOD.TASK + 1)]


def build_exemplar_list(cfg, per_class: int | None = None) -> list[str]:
    from ore.data.classes import load_task_split
    from ore.data.records import load_split

    split = load_task_split(cfg.DATASETS.CLASSES)
    task = split.check_task(cfg.OWOD.TASK)
    d = cfg.DATASETS
    records = [r for name in exemplar_sources(cfg)
               for r in load_split(d.ROOT, name, split, d.FORMAT, d.IMAGE_DIR)]
    n = cfg.EXEMPLARS.PER_CLASS if per_class is None else per_class
    return select_exemplars(records, split, task, n, seed=cfg.SEED)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the finetune config (task, classes, root)")
    p.add_argument("--per-class", type=int, default=None,
                   help="images per seen class (default: EXEMPLARS.PER_CLASS)")
    p.add_argument("--output", required=True, help="ImageSets-style list file to write")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from ore.config import load_config
    from ore.errors import OreError
    from ore.fileio import atomic_write_text

    if args.per_class is not None and args.per_class < 1:
        raise OreError(f"--per-class {args.per_class} must be ≥ 1")
    ids = build_exemplar_list(load_config(args.config, args.overrides), args.per_class)
    out = atomic_write_text(Path(args.output), "".join(i + "\n" for i in ids))
    print(f"{len(ids)} exemplar images → {out}")
    return 0
