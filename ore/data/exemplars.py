"""Balanced exemplar sets for the finetune after each task (SPEC §3.4).

For every class seen so far, up to N training images that contain it, chosen
deterministically: the seen training images are visited in a seeded order and an image is
taken when any of its seen classes still has fewer than N images. Each taken image counts
for every seen class in it.
"""

from __future__ import annotations

import numpy as np

from ore.data.classes import TaskSplit, load_task_split
from ore.data.records import ImageRecord, load_split


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
    """The exemplar list of a finetune config (``EXEMPLARS.PER_CLASS`` images per class
    unless ``per_class`` is given), drawn from :func:`exemplar_sources`."""
    split = load_task_split(cfg.DATASETS.CLASSES)
    task = split.check_task(cfg.OWOD.TASK)
    d = cfg.DATASETS
    records = [r for name in exemplar_sources(cfg)
               for r in load_split(d.ROOT, name, split, d.FORMAT, d.IMAGE_DIR)]
    n = cfg.EXEMPLARS.PER_CLASS if per_class is None else per_class
    return select_exemplars(records, split, task, n, seed=cfg.SEED)
