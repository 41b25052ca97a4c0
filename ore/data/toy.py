"""The toy open world (SPEC §7): a small dataset in exactly the M-OWODB layout.

Cluttered, textured backgrounds with several coloured shapes each. Twenty shape classes
are taught over four tasks; three more (``spiral``, ``hourglass``, ``bolt``) are never
taught and are the true unknowns. Objects of future and never-taught classes appear in
training images without labels, as in the real benchmark. Objects overlap: a box covers
an object's visible pixels, and an object less than 40% visible is marked difficult.

Written: ``Annotations/*.xml``, ``JPEGImages/*.jpg``, ``ImageSets/Main/{t1_train … t4_train,
t2_ft … t4_ft, all_task_val, all_task_test}.txt``, the same annotations as COCO JSON in
``annotations/<list>.json``, ``classes.yaml`` (the task split) and ``ore-toy-world.json``
(the settings it was written with, and the mark that lets ``overwrite`` replace the folder
later). The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ore.data.classes import TOY_NEVER_INTRODUCED, TOY_TASKS
from ore.errors import OreError
from ore.fileio import atomic_folder, check_output_dir

ALL_TOY_CLASSES = tuple(c for t in TOY_TASKS for c in t) + TOY_NEVER_INTRODUCED
DIFFICULT_VISIBLE_FRACTION = 0.4
MIN_SIZE, MAX_SIZE = 12, 96  # object size range in pixels (longer side)
# Written into every toy world: only a folder holding it may be replaced (``overwrite``).
MARKER = "ore-toy-world.json"


def _regular(n: int, phase: float = 0.0, r: float = 1.0) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star(points: int, inner: float) -> np.ndarray:
    outer = _regular(points, -np.pi / 2)
    inner_pts = _regular(points, -np.pi / 2 + np.pi / points, inner)
    return np.stack([outer, inner_pts], 1).reshape(-1, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1) / 17.0


def _spiral() -> np.ndarray:
    t = np.linspace(0.0, 3.2 * np.pi, 60)
    r = 0.15 + 0.85 * t / t[-1]
    outer = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    inner = np.stack([(r - 0.22) * np.cos(t), (r - 0.22) * np.sin(t)], 1)
    return np.concatenate([outer, inner[::-1]])


# Polygons in [-1, 1]² (y down). Circles and rings are drawn by the functions below.
_POLYGONS = {
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8,
    "triangle": _regular(3, -np.pi / 2),
    "cross": np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1],
                       [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]], float),
    "star": _star(5, 0.42),
    "hexagon": _regular(6),
    "diamond": np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], float),
    "arrow": np.array([[-1, -.25], [.2, -.25], [.2, -.7], [1, 0], [.2, .7], [.2, .25],
                       [-1, .25]], float),
    "heart": _heart(),
    "pentagon": _regular(5, -np.pi / 2),
    "trapezoid": np.array([[-1, .6], [1, .6], [.5, -.6], [-.5, -.6]], float),
    "lshape": np.array([[-.8, -1], [-.2, -1], [-.2, .4], [.8, .4], [.8, 1], [-.8, 1]], float),
    "tshape": np.array([[-1, -1], [1, -1], [1, -.4], [.3, -.4], [.3, 1], [-.3, 1], [-.3, -.4],
                        [-1, -.4]], float),
    "octagon": _regular(8, np.pi / 8),
    "parallelogram": np.array([[-1, .55], [.4, .55], [1, -.55], [-.4, -.55]], float),
    "chevron": np.array([[-1, -.8], [0, .1], [1, -.8], [1, -.1], [0, .8], [-1, -.1]], float),
    "spiral": _spiral(),
    "hourglass": np.array([[-.8, -1], [.8, -1], [.12, 0], [.8, 1], [-.8, 1], [-.12, 0]], float),
    "bolt": np.array([[-.2, -1], [.6, -1], [.15, -.15], [.65, -.15], [-.4, 1], [-.05, .1],
                      [-.55, .1]], float),
}


def _shape_mask(name: str, size: int, aspect: float, angle: float) -> np.ndarray:
    """A uint8 mask (size × size) of one shape, scaled by ``aspect`` and rotated."""
    s = size
    mask = np.zeros((s, s), np.uint8)
    c = (s - 1) / 2.0
    r = s / 2.0 - 0.5
    sx, sy = (1.0, 1.0 / aspect) if aspect >= 1 else (aspect, 1.0)
    if name in ("circle", "ring", "crescent", "ellipse", "semicircle"):
        axes = (max(1, int(round(r * sx))), max(1, int(round(r * sy))))
        if name == "ellipse":
            axes = (max(1, int(round(r))), max(1, int(round(r * 0.5))))
        deg = float(np.degrees(angle))
        if name == "semicircle":
            cv2.ellipse(mask, (int(c), int(c + r * 0.4)), axes, deg, 180, 360, 255, -1)
        else:
            cv2.ellipse(mask, (int(c), int(c)), axes, deg, 0, 360, 255, -1)
        if name == "ring":
            inner = (max(1, axes[0] // 2), max(1, axes[1] // 2))
            cv2.ellipse(mask, (int(c), int(c)), inner, deg, 0, 360, 0, -1)
        elif name == "crescent":
            off = int(round(r * 0.45))
            cv2.ellipse(mask, (int(c + off * np.cos(angle)), int(c + off * np.sin(angle))),
                        axes, deg, 0, 360, 0, -1)
        return mask
    pts = _POLYGONS[name] * np.array([sx, sy])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T * r + c
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    return mask


def _class_colors() -> dict[str, np.ndarray]:
    """A fixed hue per class (BGR), spread over the colour wheel in a shuffled order."""
    order = np.random.default_rng(12345).permutation(len(ALL_TOY_CLASSES))
    colors = {}
    for name, k in zip(ALL_TOY_CLASSES, order):
        hsv = np.uint8([[[int(180 * k / len(ALL_TOY_CLASSES)), 200, 220]]])
        colors[name] = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    return colors


CLASS_COLORS = _class_colors()


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency colour field + stripes + fine noise: texture the detector must ignore."""
    grid = rng.uniform(40, 200, (rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.float32)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.4)
    stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * freq)
    img += (stripes * rng.uniform(5, 25))[..., None]
    img += rng.normal(0, rng.uniform(4, 12), (h, w, 3)).astype(np.float32)
    return img


def _clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Random strokes and small blobs that are not objects."""
    h, w = img.shape[:2]
    for _ in range(rng.integers(3, 9)):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        if rng.random() < 0.6:
            pts = np.stack([rng.integers(0, w, 4), rng.integers(0, h, 4)], 1).astype(np.int32)
            cv2.polylines(img, [pts], False, color, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(2, 7)), int(rng.integers(2, 7)))
            cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)


@dataclass
class ToyObject:
    name: str
    box: tuple[int, int, int, int]  # VOC 1-based inclusive xmin, ymin, xmax, ymax
    difficult: bool


def render_image(
    rng: np.random.Generator, class_weights: np.ndarray
) -> tuple[np.ndarray, list[ToyObject]]:
    """One image (uint8 BGR) and its visible objects; classes drawn from ``class_weights``."""
    h, w = int(rng.integers(144, 209)), int(rng.integers(176, 257))
    img = _background(rng, h, w)
    _clutter(rng, img)
    owner = np.full((h, w), -1, np.int16)  # which object owns each pixel (later ones occlude)
    drawn: list[tuple[str, int]] = []
    n = int(rng.integers(2, 7))
    classes = rng.choice(len(ALL_TOY_CLASSES), size=n, p=class_weights)
    for k in classes:
        name = ALL_TOY_CLASSES[k]
        # Log-uniform size so that small objects are as common as in real photos.
        size = int(round(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_SIZE)))))
        size = min(size, h - 2, w - 2)
        mask = _shape_mask(name, size, rng.uniform(0.75, 1.33), rng.uniform(0, 2 * np.pi))
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        alpha = (mask.astype(np.float32) / 255.0)[..., None]
        color = CLASS_COLORS[name] + rng.normal(0, 10, 3).astype(np.float32)
        shade = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(1.0, 1.2), size, dtype=np.float32)
        patch = color[None, None, :] * shade[None, :, None]
        region = img[y0:y0 + size, x0:x0 + size]
        region[:] = region * (1 - alpha) + patch * alpha
        owner[y0:y0 + size, x0:x0 + size][mask >= 128] = len(drawn)
        drawn.append((name, int((mask >= 128).sum())))
    img += rng.normal(0, 3, img.shape).astype(np.float32)  # sensor noise over everything
    objects = []
    for i, (name, area) in enumerate(drawn):
        ys, xs = np.nonzero(owner == i)
        if len(xs) == 0 or area == 0:
            continue  # fully hidden: not annotated
        box = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(ToyObject(name, box, len(xs) / area < DIFFICULT_VISIBLE_FRACTION))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _weights_for_task(task: int | None) -> np.ndarray:
    """Class sampling weights: a training image of task t is mostly task-t classes."""
    n = len(ALL_TOY_CLASSES)
    if task is None:  # evaluation images: every class equally likely
        return np.full(n, 1.0 / n)
    w = np.zeros(n)
    own = [ALL_TOY_CLASSES.index(c) for c in TOY_TASKS[task - 1]]
    never = [ALL_TOY_CLASSES.index(c) for c in TOY_NEVER_INTRODUCED]
    others = [i for i in range(n) if i not in own and i not in never]
    w[own] = 0.55 / len(own)
    w[others] = 0.30 / len(others)
    w[never] = 0.15 / len(never)
    return w


def _voc_xml(image_id: str, width: int, height: int, objects: list[ToyObject]) -> str:
    lines = [
        "<annotation>",
        "  <folder>toy</folder>",
        f"  <filename>{image_id}.jpg</filename>",
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for o in objects:
        lines += [
            "  <object>",
            f"    <name>{o.name}</name>",
            "    <pose>Unspecified</pose>",
            "    <truncated>0</truncated>",
            f"    <difficult>{int(o.difficult)}</difficult>",
            f"    <bndbox><xmin>{o.box[0]}</xmin><ymin>{o.box[1]}</ymin>"
            f"<xmax>{o.box[2]}</xmax><ymax>{o.box[3]}</ymax></bndbox>",
            "  </object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _coco_json(ids: list[str], images: dict[str, tuple[int, int, list[ToyObject]]]) -> str:
    cat_ids = {name: i for i, name in enumerate(ALL_TOY_CLASSES, start=1)}
    out_images, anns = [], []
    for num, image_id in enumerate(ids, start=1):
        w, h, objects = images[image_id]
        out_images.append({"id": num, "file_name": f"{image_id}.jpg", "width": w, "height": h})
        for o in objects:
            bw, bh = o.box[2] - o.box[0] + 1, o.box[3] - o.box[1] + 1
            anns.append({
                "id": len(anns) + 1, "image_id": num, "category_id": cat_ids[o.name],
                "bbox": [o.box[0] - 1, o.box[1] - 1, bw, bh], "area": bw * bh,
                "iscrowd": int(o.difficult),
            })
    cats = [{"id": i, "name": n, "supercategory": "shape"} for n, i in cat_ids.items()]
    return json.dumps({"images": out_images, "annotations": anns, "categories": cats},
                      sort_keys=True)


def _exemplar_list(
    train_lists: list[list[str]], images: dict, classes: set[str], per_class: int
) -> list[str]:
    """Up to ``per_class`` images per class, earliest training images first, deduplicated."""
    chosen: list[str] = []
    count = dict.fromkeys(sorted(classes), 0)
    for ids in train_lists:
        for image_id in ids:
            names = {o.name for o in images[image_id][2] if o.name in classes}
            if any(count[c] < per_class for c in names):
                chosen.append(image_id)
                for c in names:
                    count[c] += 1
    return chosen


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """``out`` may become the toy world: it is missing, empty, or (with ``overwrite``) a
    toy world; never the current folder, one of its ancestors, the home folder or ``/``."""
    check_output_dir(out, "--out")
    if out.is_symlink():
        raise OreError(f"--out: {out} is a symbolic link; give the folder itself")
    target = Path(os.path.realpath(out))
    home = Path(os.path.realpath(os.path.expanduser("~")))
    here = Path(os.path.realpath(os.getcwd()))
    if here.is_relative_to(target) or target in (Path(target.anchor), home):
        raise OreError(f"--out: {out} is {target}, which holds the current folder, the home "
                       "folder or the whole file system; choose a new folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise OreError(f"--out: {out} is not empty and holds no toy world (no {MARKER}); "
                       "it is never replaced: choose another --out")
    if not overwrite:
        raise OreError(f"--out: {out} exists and is not empty (a toy world); choose another "
                       "--out or pass --overwrite to replace it")


def write_toy_world(
    out: str | Path, *, seed: int = 0, images_per_task: int = 300, val_images: int = 200,
    test_images: int = 300, exemplars_per_class: int = 20, overwrite: bool = False,
) -> Path:
    """Write the toy world to ``out`` (atomically: a temporary folder renamed at the end).

    An existing folder must be empty, or hold a toy world (its :data:`MARKER`) and
    ``overwrite`` be set: nothing else is ever deleted.
    """
    out = Path(out)
    _check_replaceable(out, overwrite)
    if min(images_per_task, val_images, test_images) < 1:
        raise OreError("toy world sizes must be at least 1 image per list")
    settings = dict(seed=seed, images_per_task=images_per_task, val_images=val_images,
                    test_images=test_images, exemplars_per_class=exemplars_per_class)
    with atomic_folder(Path(os.path.abspath(out))) as tmp:
        (tmp / MARKER).write_text(json.dumps(settings, indent=2) + "\n")
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main", "annotations"):
            (tmp / sub).mkdir(parents=True)
        plan: list[tuple[str, int | None]] = []
        for t in range(1, len(TOY_TASKS) + 1):
            plan += [(f"t{t}_train", t)] * images_per_task
        plan += [("all_task_val", None)] * val_images + [("all_task_test", None)] * test_images
        lists: dict[str, list[str]] = {}
        images: dict[str, tuple[int, int, list[ToyObject]]] = {}
        for index, (list_name, task) in enumerate(plan):
            # One generator per image: the content of image i depends only on (seed, i).
            rng = np.random.default_rng([seed, index])
            img, objects = render_image(rng, _weights_for_task(task))
            image_id = f"{index + 1:06d}"
            ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            assert ok
            (tmp / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpg.tobytes())
            h, w = img.shape[:2]
            (tmp / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, w, h, objects))
            images[image_id] = (w, h, objects)
            lists.setdefault(list_name, []).append(image_id)
        train_lists = [lists[f"t{t}_train"] for t in range(1, len(TOY_TASKS) + 1)]
        for t in range(2, len(TOY_TASKS) + 1):
            seen = {c for task in TOY_TASKS[:t] for c in task}
            lists[f"t{t}_ft"] = _exemplar_list(train_lists[:t], images, seen, exemplars_per_class)
        for name, ids in lists.items():
            (tmp / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
            (tmp / "annotations" / f"{name}.json").write_text(_coco_json(ids, images))
        task_lines = "\n".join(f"  - [{', '.join(t)}]" for t in TOY_TASKS)
        (tmp / "classes.yaml").write_text(
            f"tasks:\n{task_lines}\nnever_introduced: [{', '.join(TOY_NEVER_INTRODUCED)}]\n"
        )
    return out
