#!/usr/bin/env python
"""Dataset folders in the VOC/OWOD layout (SPEC §4, §9): the public benchmarks from their
downloads, or COCO instances JSON with task lists made here.

**M-OWODB and S-OWODB** from the downloads and the public lists (``datasets/README.md``)::

    python datasets/prepare_owod.py mowodb \\
        --voc2007 VOCtrainval_06-Nov-2007.tar VOCtest_06-Nov-2007.tar \\
        --voc2012 VOCtrainval_11-May-2012.tar \\
        --coco-train-images train2017.zip --coco-val-images val2017.zip \\
        --coco-annotations annotations_trainval2017.zip \\
        --lists OWOD_imagesets --out datasets/OWOD [--copy]
    python datasets/prepare_owod.py sowodb --coco-… --lists OW-DETR/data/OWDETR/VOC2007 \\
        --out datasets/SOWOD

Each input is an extracted folder or the archive itself (extracted into ``<out>-archives``
beside ``--out``, or ``--extract-to``; only ``Annotations/``, ``JPEGImages/`` and the two
``instances_*2017.json`` are taken out). One ``Annotations/`` + ``JPEGImages/`` folder holds
every listed image under its own id (VOC ids such as ``000005`` and ``2008_000002``, COCO
file stems such as ``000000000139``): VOC XML copied as it is, COCO converted as the
reference did (:func:`coco_reference_boxes`: ``xmax = int(x + w + 1)``, ``difficult`` 0,
VOC class spelling); images linked (``--copy`` copies them). Every list of ``--lists`` is
installed in ``ImageSets/Main/`` as it is, repeated ids kept; OW-DETR's ``test`` list also
as ``all_task_test``. Before anything is written, the line counts of the public lists are
checked (``--expect-counts`` to change or skip that) and every listed id must have an
annotation and an image; each problem is printed on its own line (up to 20 per list) and
the exit status is 2.

**Own task lists** from COCO JSON, for users without the public lists::

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
published ones; assemble the public lists with ``mowodb`` for that.

Image ids are the image file names without extension; they must be unique across both
JSON files. User mistakes print ``error: …`` lines and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

try:
    import ore  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ore.data.classes import TaskSplit, canonical_name, load_task_split
from ore.data.exemplars import select_exemplars
from ore.data.records import VOC_IMAGE_EXTENSIONS, ImageRecord, load_coco_json, voc_xml
from ore.errors import OreError
from ore.fileio import atomic_folder

log = logging.getLogger("prepare_owod")


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
                (tmp / "Annotations" / f"{r.image_id}.xml").write_text(
                    voc_xml(r, file_name=name))
                _place_image(src, tmp / "JPEGImages" / name, copy)
            for name, ids in lists.items():
                (tmp / "ImageSets" / "Main" / f"{name}.txt").write_text(
                    "".join(i + "\n" for i in ids))
    except OSError as exc:  # a full disk, a filesystem without links, a read-only folder
        raise OreError(f"cannot write {out}: {exc}") from None
    return {name: len(ids) for name, ids in lists.items()}


# ---------------------------------------------------------------------------------------
# The public benchmarks: M-OWODB (VOC 2007 + 2012 and COCO 2017) and S-OWODB (COCO 2017),
# assembled from the downloads and the public lists (SPEC §9).

# Line counts of the public lists. M-OWODB: the ORE paper's lists (SPEC §9; t3_train and
# t4_train are COCO-only lists of 39,402 and 40,260 ids). S-OWODB: OW-DETR's lists (its
# ``test`` list is the 4,952 annotated COCO val2017 images); its other lists are reported
# with their counts but not checked.
MOWODB_COUNTS = {"t1_train": 16_551, "t2_train": 45_520, "t2_ft": 1_743, "t3_train": 39_402,
                 "t3_ft": 2_361, "t4_train": 40_260, "t4_ft": 2_749, "all_task_val": 4_000,
                 "all_task_test": 10_246}
SOWODB_COUNTS = {"t1_train": 89_490, "t4_train": 38_903, "all_task_test": 4_952}
TASK_LISTS = ("t1_train", "t2_train", "t2_ft", "t3_train", "t3_ft", "t4_train", "t4_ft")
REQUIRED = {"mowodb": (*TASK_LISTS, "all_task_val", "all_task_test"),
            "sowodb": (*TASK_LISTS, "all_task_test")}
COUNTS = {"mowodb": MOWODB_COUNTS, "sowodb": SOWODB_COUNTS}
SPLIT_OF = {"mowodb": "owod", "sowodb": "sowod"}
# Problems listed per list before the rest are only counted.
SHOWN_PER_LIST = 20
COCO_JSONS = ("instances_train2017.json", "instances_val2017.json")


class InputProblems(OreError):
    """Several problems with the inputs, each one line (``problems``); nothing was written."""

    def __init__(self, problems: list[str], summary: str):
        super().__init__(summary)
        self.problems = problems


def coco_reference_boxes(xywh: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` boxes [N, 4] → the VOC corners the reference's conversion wrote.

    ``xmin = int(x + 1)``, ``ymin = int(y + 1)``, ``xmax = int(x + w + 1)``,
    ``ymax = int(y + h + 1)`` (truncation, in double precision as in Python), not clipped
    to the image: a box reaching the right edge gets ``xmax = width + 1`` (the readers clip
    it). This keeps one more pixel than :func:`ore.data.records.load_coco_json`'s
    ``xmax = x + w``, as the published M-OWODB numbers were computed with.
    """
    b = np.asarray(xywh, np.float64).reshape(-1, 4)
    x, y, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return np.trunc(np.stack([x + 1.0, y + 1.0, x + w + 1.0, y + h + 1.0], axis=1)).astype(
        np.int64)


# -- archives ------------------------------------------------------------------------------

_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def _archive_stem(path: Path) -> str | None:
    name = path.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _keep_voc(member: str) -> bool:  # VOC tars also hold segmentation masks: not needed
    parts = member.split("/")
    return "Annotations" in parts[:-1] or "JPEGImages" in parts[:-1]


def _keep_coco_annotations(member: str) -> bool:  # captions and keypoints are not needed
    return member.rsplit("/", 1)[-1] in COCO_JSONS


def _keep_all(member: str) -> bool:
    return True


def materialise(path: str | Path, flag: str, extract_root: Path, keep=_keep_all) -> Path:
    """``path`` itself when it is a folder; an archive (.tar, .tar.gz, .tgz, .zip) is
    extracted into ``extract_root/<archive name>/`` (its members that ``keep`` accepts) and
    that folder returned. An archive extracted before is not extracted again."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise OreError(f"{flag} {path}: no such folder or archive")
    stem = _archive_stem(path)
    if stem is None:
        raise OreError(f"{flag} {path}: not a folder nor a .tar/.tar.gz/.tgz/.zip archive")
    dest = extract_root / stem
    if dest.is_dir():
        log.info("%s: using %s, extracted before", path.name, dest)
        return dest
    log.info("extracting %s into %s", path, dest)
    try:
        with atomic_folder(dest) as tmp:
            if path.name.lower().endswith(".zip"):
                with zipfile.ZipFile(path) as z:  # extract() drops absolute and '..' parts
                    for name in z.namelist():
                        if not name.endswith("/") and keep(name):
                            z.extract(name, tmp)
            else:
                with tarfile.open(path) as tar:
                    members = [m for m in tar.getmembers() if m.isfile() and keep(m.name)]
                    tar.extractall(tmp, members=members, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise OreError(f"{flag} {path}: cannot extract ({exc})") from None
    except OSError as exc:
        raise OreError(f"{flag} {path}: cannot extract into {dest} ({exc})") from None
    return dest


# -- sources -------------------------------------------------------------------------------


def _voc_root(folder: Path, year: str, flag: str, given: Path) -> Path:
    """The ``VOC<year>`` folder (with ``Annotations/`` and ``JPEGImages/``) in ``folder``:
    ``folder`` itself, ``folder/VOC<year>`` or ``folder/VOCdevkit/VOC<year>`` (the layout
    the VOC archives unpack to)."""
    for c in (folder, folder / f"VOC{year}", folder / "VOCdevkit" / f"VOC{year}"):
        if (c / "Annotations").is_dir() and (c / "JPEGImages").is_dir():
            return c
    raise OreError(f"{flag} {given}: no VOC{year} folder with Annotations/ and JPEGImages/ "
                   f"(expected VOCdevkit/VOC{year}/ as in the VOC archives)")


def _sub_folder(folder: Path, name: str) -> Path:
    """``folder/name`` when it exists (the folder an archive unpacks to), else ``folder``."""
    return folder / name if (folder / name).is_dir() else folder


def _scan(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """``{stem: path}`` of the files in ``folder`` whose suffix (any case) is in ``suffixes``."""
    found = {}
    with os.scandir(folder) as entries:
        for e in entries:
            stem, dot, ext = e.name.rpartition(".")
            if dot and f".{ext.lower()}" in suffixes and e.is_file():
                found[stem] = Path(e.path)
    return found


class Sources:
    """Where each image id's annotation and image are: VOC XML files to copy, COCO image
    entries to convert, and image files to link or copy."""

    def __init__(self):
        self.voc_xml: dict[str, Path] = {}
        self.coco: dict[str, tuple[dict, Path]] = {}  # stem → (image entry, its JSON file)
        self.image: dict[str, Path] = {}
        self.origin: dict[str, str] = {}  # id → the input it came from

    def claim(self, image_id: str, origin: str) -> None:
        if image_id in self.origin and self.origin[image_id] != origin:
            raise OreError(f"image id {image_id!r} is in both {self.origin[image_id]} and "
                           f"{origin}; ids must be unique across the inputs")
        self.origin[image_id] = origin

    def add_voc(self, root: Path) -> None:
        xmls = _scan(root / "Annotations", (".xml",))
        images = _scan(root / "JPEGImages", VOC_IMAGE_EXTENSIONS)
        for i in xmls.keys() | images.keys():
            self.claim(i, str(root))
        self.voc_xml.update(xmls)
        self.image.update(images)

    def add_coco(self, json_path: Path, image_dir: Path, data: dict) -> None:
        images = _scan(image_dir, VOC_IMAGE_EXTENSIONS) if image_dir.is_dir() else {}
        try:
            entries = data["images"]
            for img in entries:
                name = img["file_name"]
                if not isinstance(name, str) or Path(name).name != name:
                    raise OreError(f"{json_path}: file_name {name!r} is not a plain file name")
                stem = Path(name).stem
                self.claim(stem, str(json_path))
                self.coco[stem] = (img, json_path)
                if stem in images:
                    self.image[stem] = images[stem]
        except (KeyError, TypeError) as exc:
            raise OreError(f"{json_path}: not a COCO instances file ({exc})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise OreError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise OreError(f"{path}: not a COCO instances file ({exc})") from None
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise OreError(f"{path}: not a COCO instances file (no 'images' or 'categories')")
    return data


def coco_records(data: dict, json_path: Path, wanted: dict[str, tuple[dict, Path]],
                 split: TaskSplit) -> dict[str, ImageRecord]:
    """Records of the ``wanted`` images of one COCO instances file, boxes by
    :func:`coco_reference_boxes`, names in VOC spelling, every object ``difficult`` 0 (crowd
    boxes included), as the reference's conversion wrote them."""
    try:
        categories = {c["id"]: canonical_name(c["name"]) for c in data["categories"]}
        anns = data.get("annotations", [])
        want = {img["id"]: stem for stem, (img, j) in wanted.items() if j == json_path}
        img_ids = np.fromiter((a["image_id"] for a in anns), np.int64, len(anns))
        idx = np.flatnonzero(np.isin(img_ids, np.fromiter(want, np.int64, len(want))))
        idx = idx[np.argsort(img_ids[idx], kind="stable")]  # objects in file order per image
        xywh = np.asarray([anns[i]["bbox"] for i in idx], np.float64).reshape(-1, 4)
        names = [categories[anns[i]["category_id"]] for i in idx]
    except (KeyError, TypeError, ValueError) as exc:
        raise OreError(f"{json_path}: malformed annotation ({type(exc).__name__}: {exc})") from None
    if not np.isfinite(xywh).all():
        raise OreError(f"{json_path}: a bbox is not 4 finite numbers [x, y, width, height]")
    for name in sorted(set(names)):
        if not split.is_known_name(name):
            raise OreError(f"{json_path}: category {name!r} is in no task of split {split.name}")
    boxes = coco_reference_boxes(xywh).astype(np.float32)  # whole pixels, exact in float32
    sorted_ids = img_ids[idx]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(idx) else idx
    ends = np.r_[starts[1:], len(idx)].astype(np.int64)
    bounds = dict(zip(sorted_ids[starts].tolist(), zip(starts.tolist(), ends.tolist())))
    records = {}
    for image_id, stem in want.items():
        img = wanted[stem][0]
        lo, hi = bounds.get(image_id, (0, 0))
        try:
            width, height = int(img["width"]), int(img["height"])
        except (KeyError, TypeError, ValueError) as exc:
            raise OreError(f"{json_path}: image {stem} has no valid width/height ({exc})") from None
        records[stem] = ImageRecord(image_id=stem, file_name=img["file_name"], width=width,
                                    height=height, boxes=boxes[lo:hi], names=names[lo:hi],
                                    difficult=np.zeros(hi - lo, bool))
    return records


# -- lists ---------------------------------------------------------------------------------


def find_lists(folder: str | Path, benchmark: str) -> dict[str, Path]:
    """``{name: path}`` of every ``.txt`` list in ``folder`` (or in its ``ImageSets/Main``,
    ``ImageSets`` or ``Main``, where the public lists are shipped). For S-OWODB, OW-DETR's
    ``test`` list is also installed as ``all_task_test`` (the configs' ``DATASETS.TEST``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OreError(f"--lists {folder}: no such folder")
    where = next((c for c in (folder, folder / "ImageSets" / "Main", folder / "ImageSets",
                              folder / "Main") if (c / "t1_train.txt").is_file()), folder)
    lists = {p.stem: p for p in sorted(where.glob("*.txt")) if p.is_file()}
    if benchmark == "sowodb" and "all_task_test" not in lists and "test" in lists:
        lists["all_task_test"] = lists["test"]
    return lists


def read_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, id)`` of every non-blank line, repeats kept (the published protocol
    counts them)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise OreError(f"cannot read list {path}: {exc}") from None
    return [(n, s) for n, s in enumerate((line.strip() for line in text.splitlines()), 1) if s]


def parse_expect_counts(text: str | None, benchmark: str) -> dict[str, int]:
    """``--expect-counts``: ``NAME=N,NAME=N`` (the lists to check, and their line counts),
    ``none`` (check no count), or unset (the public lists' counts)."""
    if text is None:
        return dict(COUNTS[benchmark])
    if text.strip().lower() == "none":
        return {}
    counts = {}
    for item in text.split(","):
        name, eq, n = item.strip().partition("=")
        if not eq or not name or not n.strip().isdigit():
            raise OreError(f"--expect-counts {text!r}: expected NAME=N[,NAME=N…] or none, "
                           f"e.g. t1_train=16551")
        counts[name] = int(n)
    return counts


def check_lists(lists: dict[str, Path], lines: dict[str, list[tuple[int, str]]],
                sources: Sources,
                expect: dict[str, int], required: tuple[str, ...], folder: Path) -> list[str]:
    """One line per problem: a missing list, a line count that differs from ``expect``, and
    each listed id without an annotation or an image (:data:`SHOWN_PER_LIST` per list, then
    a count of the rest)."""
    problems = [f"--lists {folder}: no {name}.txt" for name in required if name not in lists]
    for name, n in expect.items():
        if name in lines and len(lines[name]) != n:
            problems.append(f"{lists[name]}: {len(lines[name]):,} ids, expected {n:,} (the "
                            f"public list); a different or truncated list?")
        elif name not in lists and name not in required:
            problems.append(f"--lists {folder}: no {name}.txt (given in --expect-counts)")
    for name, ids in lines.items():
        bad = []
        for line_no, i in ids:
            ann = i in sources.voc_xml or i in sources.coco
            img = i in sources.image
            if not (ann and img):
                what = ("no annotation and no image" if not (ann or img)
                        else "no annotation" if not ann else "no image")
                bad.append(f"{lists[name].name}:{line_no}: {i}: {what}")
        problems += bad[:SHOWN_PER_LIST]
        if len(bad) > SHOWN_PER_LIST:
            problems.append(f"{lists[name].name}: {len(bad) - SHOWN_PER_LIST} more ids without "
                            "an annotation or an image")
    return problems


def assemble(benchmark: str, *, lists: str | Path, out: str | Path,
             coco_train_images, coco_val_images, coco_annotations,
             voc2007=(), voc2012=(), copy: bool = False, expect_counts: str | None = None,
             extract_to: str | Path | None = None) -> dict[str, tuple[int, int]]:
    """Assemble M-OWODB (``mowodb``) or S-OWODB (``sowodb``) in ``out``.

    Every listed image gets ``Annotations/<id>.xml`` (VOC: the original file copied; COCO:
    converted by :func:`coco_records`) and ``JPEGImages/<id>.<ext>`` (a symbolic link to the
    source, or a copy); every list is installed in ``ImageSets/Main/``. Nothing is written
    unless every check passes (:class:`InputProblems` lists what failed).

    Returns:
        ``{list name: (lines, unique ids)}`` of the installed lists.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OreError(f"{out} exists and is not an empty folder; choose another --out")
    split = load_task_split(SPLIT_OF[benchmark])
    expect = parse_expect_counts(expect_counts, benchmark)
    found = find_lists(lists, benchmark)
    numbered = {name: read_lines(p) for name, p in found.items()}
    lines = {name: [i for _, i in ids] for name, ids in numbered.items()}
    extract_root = Path(extract_to) if extract_to else out.parent / f"{out.name}-archives"

    sources = Sources()
    for flag, year, given in [("--voc2007", "2007", p) for p in voc2007] + [
            ("--voc2012", "2012", p) for p in voc2012]:
        folder = materialise(given, flag, extract_root, _keep_voc)
        sources.add_voc(_voc_root(folder, year, flag, Path(given)))
    ann_dir = materialise(coco_annotations, "--coco-annotations", extract_root,
                          _keep_coco_annotations)
    ann_dir = _sub_folder(ann_dir, "annotations")
    coco_data = {}
    for json_name, images, flag, sub in (
            (COCO_JSONS[0], coco_train_images, "--coco-train-images", "train2017"),
            (COCO_JSONS[1], coco_val_images, "--coco-val-images", "val2017")):
        image_dir = _sub_folder(materialise(images, flag, extract_root), sub)
        json_path = ann_dir / json_name
        log.info("reading %s", json_path)
        coco_data[json_path] = _read_json(json_path)
        sources.add_coco(json_path, image_dir, coco_data[json_path])

    problems = check_lists(found, numbered, sources, expect, REQUIRED[benchmark], Path(lists))
    if problems:
        raise InputProblems(problems, f"{len(problems)} problems with the inputs; nothing "
                                      f"written to {out}")

    listed = dict.fromkeys(i for ids in lines.values() for i in ids)
    wanted = {i: sources.coco[i] for i in listed if i not in sources.voc_xml}
    records: dict[str, ImageRecord] = {}
    for json_path, data in coco_data.items():
        records.update(coco_records(data, json_path, wanted, split))
    try:
        with atomic_folder(out) as tmp:  # out is new or empty (checked above)
            for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
                (tmp / sub).mkdir(parents=True)
            for i in listed:
                src = sources.image[i]
                name = i + src.suffix.lower()
                if i in sources.voc_xml:
                    shutil.copyfile(sources.voc_xml[i], tmp / "Annotations" / f"{i}.xml")
                else:
                    (tmp / "Annotations" / f"{i}.xml").write_text(
                        voc_xml(records[i], file_name=name))
                _place_image(src, tmp / "JPEGImages" / name, copy)
            for list_name, ids in lines.items():
                (tmp / "ImageSets" / "Main" / f"{list_name}.txt").write_text(
                    "".join(i + "\n" for i in ids))
    except OSError as exc:  # a full disk, a filesystem without links, a read-only folder
        raise OreError(f"cannot write {out}: {exc}") from None
    return {name: (len(ids), len(set(ids))) for name, ids in lines.items()}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="prepare_owod.py",
        description="COCO instances JSON → VOC/OWOD layout with task lists made here. For the "
                    "public benchmarks from their downloads and lists, see "
                    "`prepare_owod.py mowodb --help` and `prepare_owod.py sowodb --help`.")
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


BENCHMARKS = {
    "mowodb": "M-OWODB (the ORE split): VOC 2007 + 2012 and COCO 2017 with the ORE lists",
    "sowodb": "S-OWODB (the OW-DETR split): COCO 2017 with OW-DETR's lists",
}


def build_benchmark_parser(benchmark: str) -> argparse.ArgumentParser:
    counts = ", ".join(f"{k} {v:,}" for k, v in COUNTS[benchmark].items())
    p = _ArgumentParser(
        prog=f"prepare_owod.py {benchmark}",
        description=f"Assemble {BENCHMARKS[benchmark]} in one VOC-layout folder (Annotations/, "
                    "JPEGImages/, ImageSets/Main/). Each input is an extracted folder or the "
                    "downloaded archive (extracted beside --out).")
    if benchmark == "mowodb":
        p.add_argument("--voc2007", nargs="+", required=True, metavar="DIR_OR_TAR",
                       help="VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar, or "
                            "the VOCdevkit folder they unpack to")
        p.add_argument("--voc2012", nargs="+", required=True, metavar="DIR_OR_TAR",
                       help="VOCtrainval_11-May-2012.tar, or its VOCdevkit folder")
    p.add_argument("--coco-train-images", required=True, metavar="DIR_OR_ZIP",
                   help="train2017.zip or the train2017/ folder")
    p.add_argument("--coco-val-images", required=True, metavar="DIR_OR_ZIP",
                   help="val2017.zip or the val2017/ folder")
    p.add_argument("--coco-annotations", required=True, metavar="DIR_OR_ZIP",
                   help="annotations_trainval2017.zip or the annotations/ folder with "
                        "instances_train2017.json and instances_val2017.json")
    p.add_argument("--lists", required=True, metavar="DIR",
                   help="folder with the public lists (t1_train.txt … "
                        + ("all_task_test.txt" if benchmark == "mowodb" else "test.txt")
                        + "; also found under ImageSets/Main/ or ImageSets/)")
    p.add_argument("--out", required=True, help="dataset root to write (new or empty)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--copy", action="store_true", help="copy images into JPEGImages/")
    how.add_argument("--symlink", action="store_true", help="link images (the default)")
    p.add_argument("--extract-to", metavar="DIR",
                   help="where archives are extracted (default: <out>-archives beside --out; "
                        "linked images point there, so keep it unless --copy)")
    p.add_argument("--expect-counts", metavar="NAME=N,…",
                   help=f"line counts to check instead of the public lists' ({counts}); "
                        "'none' checks no count")
    return p


def main_benchmark(benchmark: str, argv: list[str]) -> int:
    args = build_benchmark_parser(benchmark).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        counts = assemble(benchmark, lists=args.lists, out=args.out,
                          coco_train_images=args.coco_train_images,
                          coco_val_images=args.coco_val_images,
                          coco_annotations=args.coco_annotations,
                          voc2007=getattr(args, "voc2007", ()) or (),
                          voc2012=getattr(args, "voc2012", ()) or (),
                          copy=args.copy, expect_counts=args.expect_counts,
                          extract_to=args.extract_to)
    except InputProblems as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for name, (lines, unique) in counts.items():
        print(f"{name:>14}: {lines} ids" + (f" ({unique} unique)" if unique != lines else ""))
    print(f"wrote {args.out}")
    if "all_task_val" not in counts:
        print("no all_task_val list: `ore run-tasks` fits the energy (EBUI) on EBUI.FIT_SPLIT "
              "(all_task_val); pass EBUI.FIT_SPLIT=<a held-out list> or EBUI.RUN_TASKS=false")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in BENCHMARKS:
        return main_benchmark(argv[0], argv[1:])
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
