"""Annotation readers: the VOC/OWOD layout and COCO JSON, into one record type.

Shapes: N objects in an image. Boxes stay in the annotation's own pixel convention
(VOC: 1-based, inclusive corners). COCO ``[x, y, w, h]`` boxes are converted to that
convention (``xmin = x + 1``, ``xmax = x + w``) so both formats give identical records
for the same objects, and the evaluator's VOC matching rules apply to both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from ore.data.annotation_cache import AnnotationCache, RawAnnotation
from ore.data.classes import UNKNOWN, TaskSplit, canonical_name
from ore.errors import OreError

log = logging.getLogger(__name__)

FORMATS = ("voc", "coco")
ROLES = ("train", "finetune", "test")
# The files a VOC image list's id may name: <id>.jpg, .jpeg or .png (or upper case).
VOC_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_IMAGE_SUFFIXES = (*VOC_IMAGE_EXTENSIONS, *(e.upper() for e in VOC_IMAGE_EXTENSIONS))
_SAFE_ID = re.compile(r"^[\w.\-]+$")  # list ids name files inside the root: no separators


@dataclass
class ImageRecord:
    """One image and its objects.

    Attributes:
        image_id: id as written in the ImageSets list (the file stem).
        file_name: path of the image file.
        width, height: image size in pixels.
        boxes: float32 [N, 4] ``xmin, ymin, xmax, ymax`` in VOC pixel convention.
        names: N canonical class names (``unknown`` after test-role relabelling).
        difficult: bool [N]; difficult objects are ignored by the evaluator.
    """

    image_id: str
    file_name: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    names: list[str] = field(default_factory=list)
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    def select(self, keep: np.ndarray) -> ImageRecord:
        """A copy with only the objects where ``keep`` is true."""
        keep = np.asarray(keep, bool)
        names = [n for n, k in zip(self.names, keep) if k]
        return replace(self, boxes=self.boxes[keep], names=names, difficult=self.difficult[keep])


@dataclass
class LoadStats:
    """Counts of what a loader repaired, reported once per split rather than per object."""

    clipped: int = 0
    dropped_degenerate: int = 0
    duplicate_ids: int = 0


def _check_id(image_id: str, list_path: Path, line_no: int) -> str:
    if not _SAFE_ID.match(image_id) or image_id in (".", ".."):
        raise OreError(
            f"{list_path}:{line_no}: image id {image_id!r} is not a plain file stem "
            "(letters, digits, '_', '-', '.'; no path separators)"
        )
    return image_id


def read_list_lines(list_path: Path) -> list[str]:
    """The id of every non-blank line of an ImageSets list, repeats included, in order."""
    if not list_path.is_file():
        raise OreError(f"image list not found: {list_path}")
    ids: list[str] = []
    for line_no, line in enumerate(list_path.read_text().splitlines(), start=1):
        image_id = line.strip()
        if image_id:
            ids.append(_check_id(image_id, list_path, line_no))
    return ids


def read_image_list(list_path: Path) -> list[str]:
    """Ids from an ImageSets list, each once, in first-seen order (duplicates warned)."""
    lines = read_list_lines(list_path)
    ids = list(dict.fromkeys(lines))
    if len(ids) < len(lines):
        log.warning("%s lists %d duplicate image ids; each image is loaded once", list_path,
                    len(lines) - len(ids))
    return ids


def _finalise_boxes(
    boxes: np.ndarray, width, height, stats: LoadStats
) -> np.ndarray:
    """Clip boxes to the image (VOC convention: 1..W, 1..H); mark degenerate ones.
    ``width`` and ``height``: the image's, or one per box; 0 (unknown size): not clipped.

    Returns a keep mask; clipping is done in place and counted.
    """
    if len(boxes) == 0:
        return np.zeros((0,), bool)
    w = np.broadcast_to(np.asarray(width, np.float32), (len(boxes),))
    h = np.broadcast_to(np.asarray(height, np.float32), (len(boxes),))
    sized = (w > 0) & (h > 0)
    clipped = np.where(sized[:, None], np.clip(boxes, 1, np.stack([w, h, w, h], 1)), boxes)
    stats.clipped += int(np.any(clipped != boxes, axis=1).sum())
    boxes[:] = clipped
    keep = (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    stats.dropped_degenerate += int((~keep).sum())
    return keep


def parse_voc_xml(
    xml_path: Path, image_path: Path, split: TaskSplit | None = None,
    stats: LoadStats | None = None,
) -> ImageRecord:
    """Parse one VOC XML file. Unknown class names (not in ``split``) are an error."""
    stats = stats if stats is not None else LoadStats()
    raw = _read_voc_xml(xml_path, split)
    return _voc_records([Path(xml_path).stem], [image_path], [raw], stats)[0]


def _read_voc_xml(xml_path: Path, split: TaskSplit | None,
                  names_seen: dict[str, str] | None = None) -> RawAnnotation:
    """What one VOC file says (boxes as written); ``names_seen`` memoises the checked
    canonical name of each raw class name across files."""
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise OreError(f"annotation file not found: {xml_path}") from None
    except (ET.ParseError, LookupError, ValueError) as exc:  # also unknown/bad encodings
        raise OreError(f"{xml_path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise OreError(f"cannot read annotation file {xml_path}: {exc.strerror}") from None

    def number(node, tag, cast=float):
        text = node.findtext(tag)
        try:
            value = float(text)
            if not math.isfinite(value):  # inf/nan would reach the loss as NaN
                raise ValueError
            return cast(value)
        except (TypeError, ValueError, OverflowError):
            raise OreError(f"{xml_path}: <{tag}> is {text!r}, expected a finite number") from None

    size = root.find("size")
    if size is not None:
        width, height = number(size, "width", int), number(size, "height", int)
    else:
        width = height = 0  # unknown: boxes are not clipped
    names_seen = {} if names_seen is None else names_seen
    names, boxes, difficult = [], [], []
    for obj in root.iter("object"):
        raw = obj.findtext("name")
        name = names_seen.get(raw)
        if name is None:
            if raw is None or not raw.strip():
                raise OreError(f"{xml_path}: an <object> has no <name>")
            name = canonical_name(raw)
            if split is not None and not split.is_known_name(name):
                raise OreError(
                    f"{xml_path}: class {raw!r} is in no task of split {split.name} "
                    "(add it to a task, or to never_introduced in a class-split YAML)"
                )
            names_seen[raw] = name
        bnd = obj.find("bndbox")
        if bnd is None:
            raise OreError(f"{xml_path}: object {raw!r} has no <bndbox>")
        boxes.append([number(bnd, t) for t in ("xmin", "ymin", "xmax", "ymax")])
        names.append(name)
        difficult.append(obj.findtext("difficult", "0").strip() in ("1", "true"))
    return RawAnnotation(width, height, names, np.asarray(boxes, np.float32).reshape(-1, 4),
                         np.asarray(difficult, bool).reshape(-1))


def _voc_records(image_ids: list[str], image_paths: list[Path], raws: list[RawAnnotation],
                 stats: LoadStats) -> list[ImageRecord]:
    """Records of parsed files: boxes clipped to their image, degenerate ones dropped
    (all files at once, counted in ``stats``)."""
    counts = np.fromiter((len(r.names) for r in raws), np.int64, len(raws))
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    boxes = np.concatenate([r.boxes for r in raws] + [np.zeros((0, 4), np.float32)])
    difficult = np.concatenate([r.difficult for r in raws] + [np.zeros(0, bool)])
    size = np.repeat(np.asarray([(r.width, r.height) for r in raws], np.float32).reshape(-1, 2),
                     counts, axis=0)
    keep = _finalise_boxes(boxes, size[:, 0], size[:, 1], stats)
    dropped = np.bincount(np.repeat(np.arange(len(raws)), counts)[~keep], minlength=len(raws))
    records = []
    for image_id, image_path, r, lo, hi, drop in zip(image_ids, image_paths, raws, offsets,
                                                     offsets[1:], dropped.tolist()):
        record = ImageRecord(image_id=image_id, file_name=str(image_path), width=r.width,
                             height=r.height, boxes=boxes[lo:hi], names=r.names,
                             difficult=difficult[lo:hi])
        records.append(record.select(keep[lo:hi]) if drop else record)
    return records


def voc_xml(record: ImageRecord, *, file_name: str | None = None) -> str:
    """The VOC annotation of one record (what :func:`parse_voc_xml` reads back): its size
    and one ``<object>`` per box, corners rounded to whole pixels.

    Args:
        record: the image and its objects; ``boxes`` in VOC pixel convention.
        file_name: the ``<filename>`` written (default: the name of ``record.file_name``),
            e.g. the image's name in the ``JPEGImages/`` folder it is written for.
    """
    objects = []
    corners = np.rint(record.boxes).astype(np.int64).tolist()
    for (x1, y1, x2, y2), name, difficult in zip(corners, record.names, record.difficult):
        objects.append(
            f"  <object>\n    <name>{escape(name)}</name>\n"
            f"    <difficult>{int(bool(difficult))}</difficult>\n"
            f"    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox>\n  </object>\n")
    return (f"<annotation>\n  <folder>JPEGImages</folder>\n"
            f"  <filename>{escape(file_name or Path(record.file_name).name)}</filename>\n"
            f"  <size><width>{record.width}</width><height>{record.height}</height>"
            f"<depth>3</depth></size>\n" + "".join(objects) + "</annotation>\n")


def find_image(image_dir: Path, image_id: str) -> Path:
    stem = os.path.join(image_dir, image_id)
    for ext in _IMAGE_SUFFIXES:
        if os.path.isfile(stem + ext):
            return Path(stem + ext)
    raise OreError(f"image for listed id {image_id!r} not found: {image_dir / image_id}.jpg")


def list_path(root: Path, split_name: str) -> Path:
    """``<root>/ImageSets/Main/<name>.txt``, or ``split_name`` itself when it is a .txt path
    (e.g. an exemplar list written next to a checkpoint)."""
    if split_name.endswith(".txt"):
        return Path(split_name)
    return root / "ImageSets" / "Main" / f"{split_name}.txt"


def load_voc_split(
    root: str | Path, split_name: str, split: TaskSplit | None = None,
    image_dir: str = "JPEGImages",
) -> list[ImageRecord]:
    """Records of every image listed in ``<root>/ImageSets/Main/<split_name>.txt`` (or in the
    list file ``split_name`` when it ends with ``.txt``).

    Each annotation file is parsed once; each listed image must exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise OreError(f"dataset root not found: {root}")
    ids = read_image_list(list_path(root, split_name))
    stats = LoadStats()
    images, annotations = root / image_dir, root / "Annotations"
    cache = AnnotationCache(annotations)
    folder = os.path.join(annotations, "")
    image_paths, raws = [], []
    names_seen: dict[str, str] = {}  # raw class name -> canonical, checked against split
    known: dict[str, bool] = {}  # canonical name -> known to split (as the cache holds them)
    for i in ids:
        image_paths.append(find_image(images, i))
        name = f"{i}.xml"
        try:
            stat = os.stat(folder + name)
        except OSError:
            stat = None  # _read_voc_xml names the problem
        raw = cache.lookup(name, stat) if stat is not None else None
        if raw is not None and split is not None:
            for n in set(raw.names) - known.keys():
                known[n] = split.is_known_name(n)
            if not all(map(known.__getitem__, raw.names)):
                raw = None  # parsed again, to name the class as the file writes it
        if raw is None:
            raw = _read_voc_xml(annotations / name, split, names_seen)
            if stat is not None:
                cache.store(name, stat, raw)
        raws.append(raw)
    cache.save()
    records = _voc_records(ids, image_paths, raws, stats)
    _report(stats, f"{root}:{split_name}")
    return records


def _report(stats: LoadStats, where: str) -> None:
    if stats.clipped:
        log.warning("%s: %d boxes extended past the image and were clipped", where, stats.clipped)
    if stats.dropped_degenerate:
        log.warning("%s: %d degenerate boxes (xmax < xmin or ymax < ymin) were dropped",
                    where, stats.dropped_degenerate)


def load_coco_json(
    json_path: str | Path, image_dir: str | Path, split: TaskSplit | None = None
) -> list[ImageRecord]:
    """Records from a COCO instances JSON. ``iscrowd`` objects are kept as difficult."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not json_path.is_file():
        raise OreError(f"COCO annotation file not found: {json_path}")
    try:
        data = json.loads(json_path.read_text())
        images = data["images"]
        categories = {c["id"]: canonical_name(c["name"]) for c in data["categories"]}
        annotations = data.get("annotations", [])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError,
            TypeError) as exc:  # RecursionError: absurdly deep nesting
        raise OreError(
            f"{json_path}: not a COCO instances file ({type(exc).__name__}: {exc})"
        ) from None
    by_image: dict[int, list[dict]] = {}
    for i, ann in enumerate(annotations):
        try:
            by_image.setdefault(ann["image_id"], []).append(ann)
            if ann["category_id"] not in categories:
                raise KeyError(f"category_id {ann['category_id']}")
        except (KeyError, TypeError) as exc:
            raise OreError(f"{json_path}: annotation #{i} is malformed ({exc})") from None
    if split is not None:  # only categories that objects use must belong to the split
        for cat_id in sorted({a["category_id"] for a in annotations}):
            if not split.is_known_name(categories[cat_id]):
                raise OreError(f"{json_path}: category {categories[cat_id]!r} is in no task of "
                               f"split {split.name}")
    stats = LoadStats()
    records, seen = [], set()
    for img in images:
        try:
            img_id, file_name = img["id"], img["file_name"]
            width, height = int(img["width"]), int(img["height"])
        except (KeyError, TypeError, ValueError) as exc:
            raise OreError(f"{json_path}: image entry {img!r:.80} is malformed ({exc})") from None
        stem = Path(file_name).stem
        if img_id in seen:
            stats.duplicate_ids += 1
            continue
        seen.add(img_id)
        # Lexical check (no symlink resolution): image folders made of symlinks are common.
        path = Path(os.path.normpath(image_dir.absolute() / file_name))
        if not path.is_relative_to(Path(os.path.normpath(image_dir.absolute()))):
            raise OreError(f"{json_path}: file_name {file_name!r} escapes the image folder")
        if not path.is_file():
            raise OreError(f"{json_path}: image not found: {path}")
        anns = by_image.get(img_id, [])
        try:
            xywh = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        except (KeyError, ValueError, TypeError) as exc:
            raise OreError(f"{json_path}: bad bbox in image {file_name} ({exc})") from None
        # NaN or inf (also past float32's range) would reach the loss as NaN.
        finite = (np.abs(xywh) <= np.finfo(np.float32).max).all(axis=1)
        if not finite.all():
            bad = anns[int(np.argmin(finite))]
            raise OreError(f"{json_path}: annotation {bad.get('id', '?')} of image {file_name}: "
                           f"bbox {bad['bbox']} is not 4 finite numbers [x, y, width, height]")
        xywh = xywh.astype(np.float32)
        boxes = np.concatenate([xywh[:, :2] + 1, xywh[:, :2] + xywh[:, 2:]], axis=1)
        keep = _finalise_boxes(boxes, width, height, stats)
        record = ImageRecord(
            image_id=stem, file_name=str(path), width=width, height=height, boxes=boxes,
            names=[categories[a["category_id"]] for a in anns],
            difficult=np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool).reshape(-1),
        )
        records.append(record if keep.all() else record.select(keep))
    if stats.duplicate_ids:
        log.warning("%s lists %d duplicate image ids; each image is loaded once",
                    json_path, stats.duplicate_ids)
    _report(stats, str(json_path))
    return records


def load_split(
    root: str | Path, split_name: str, split: TaskSplit | None = None, fmt: str = "voc",
    image_dir: str = "JPEGImages",
) -> list[ImageRecord]:
    """Load a named split: VOC lists, or COCO ``<root>/annotations/<split_name>.json``."""
    if fmt == "voc":
        return load_voc_split(root, split_name, split, image_dir)
    if fmt == "coco":
        if split_name.endswith(".txt"):
            raise OreError(f"list file {split_name}: image lists need DATASETS.FORMAT=voc")
        root = Path(root)
        if not root.is_dir():
            raise OreError(f"dataset root not found: {root}")
        return load_coco_json(root / "annotations" / f"{split_name}.json", root / image_dir, split)
    raise OreError(f"DATASETS.FORMAT: unknown format {fmt!r}; expected one of {FORMATS}")


def apply_role(
    records: list[ImageRecord], split: TaskSplit, task: int, role: str
) -> list[ImageRecord]:
    """Filter annotations by the split role of ``task`` (SPEC §4).

    - ``train``: only classes introduced in ``task`` are targets; images left without
      targets are dropped.
    - ``finetune``: every class seen so far is a target; other objects are dropped, and
      so are images left without targets.
    - ``test``: every object of a class not yet seen is relabelled ``unknown``.
    """
    if role == "val":
        role = "test"
    if role not in ROLES:
        raise OreError(f"split role {role!r}: expected one of {ROLES}")
    if role == "test":
        seen = set(split.seen(task))
        return [
            replace(r, names=[n if n in seen else UNKNOWN for n in r.names]) for r in records
        ]
    targets = set(split.introduced(task) if role == "train" else split.seen(task))
    out = []
    for r in records:
        keep = np.fromiter((n in targets for n in r.names), bool, len(r.names))
        if keep.any():
            out.append(r.select(keep))
    return out


def load_role_split(
    root: str | Path, split_name: str, split: TaskSplit, task: int, role: str,
    fmt: str = "voc", image_dir: str = "JPEGImages",
) -> list[ImageRecord]:
    """:func:`load_split` then :func:`apply_role`: a split as ``task`` sees it in ``role``."""
    return apply_role(load_split(root, split_name, split, fmt, image_dir), split, task, role)


def load_dataset_split(datasets_cfg, split_name: str, split: TaskSplit, task: int,
                       role: str) -> list[ImageRecord]:
    """:func:`load_role_split` with the root, format and image folder of a config's
    ``DATASETS`` section."""
    d = datasets_cfg
    return load_role_split(d.ROOT, split_name, split, task, role, d.FORMAT, d.IMAGE_DIR)


def as_listed(records: list[ImageRecord], datasets_root: str | Path, split_name: str,
              fmt: str = "voc") -> list[ImageRecord]:
    """``records`` of the list ``split_name`` (each image once, as the loaders give them)
    once per listed line, in list order: a repeated id gives the same record again. The
    evaluation counts those lines as the published protocol does (SPEC §9); COCO JSON
    splits name each image once and are returned as given."""
    if fmt != "voc":
        return list(records)
    by_id = {r.image_id: r for r in records}
    lines = read_list_lines(list_path(Path(datasets_root), split_name))
    missing = next((i for i in lines if i not in by_id), None)
    if missing is not None:
        raise ValueError(f"listed id {missing!r} of {split_name} has no record")
    return [by_id[i] for i in lines]


def dataset_stats(records: list[ImageRecord]) -> dict:
    """``{"images": n, "objects": {class: count}}`` of a list of records."""
    objects = Counter(n for r in records for n in r.names)
    return {"images": len(records), "objects": dict(sorted(objects.items()))}
