"""Parsed VOC annotation files kept between runs, so that a split is read from XML once.

One ``.npz`` per annotation folder holds what each of its parsed files gave (image size,
class names, raw boxes, difficult flags) under the file's name, size and modification
time. A file whose size or time differs from its entry is parsed again; a file is not
stored while its modification time is within :data:`SETTLE_NS` of now, since a rewrite
of the same size within the file system's timestamp granularity would not show.

Where the cache lives: ``$ORE_CACHE_DIR/annotations/`` when ``ORE_CACHE_DIR`` is set
(``off`` turns the cache off), else ``$XDG_CACHE_HOME/ore/annotations/`` or
``~/.cache/ore/annotations/``: the user's own folder, never the dataset's, which may be
read-only or shared. The cache is only ever a shortcut: an unreadable cache file is
ignored with a warning and rewritten, and a cache folder that cannot be written is
warned about once and left alone.

Shapes: F files, N objects over all of them, C distinct class names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ore.errors import OreError
from ore.fileio import atomic_write

log = logging.getLogger(__name__)

CACHE_ENV = "ORE_CACHE_DIR"
VERSION = 1
SETTLE_NS = 2_000_000_000  # files modified within the last 2 s are parsed, not stored
_ARRAYS = ("version", "files", "size", "mtime_ns", "width", "height", "offsets", "boxes",
           "difficult", "classes", "class_index")
_unwritable: set[Path] = set()  # cache files already warned about in this process


class RawAnnotation(NamedTuple):
    """What one VOC file says, before any clipping or split-specific filtering.

    Attributes:
        width, height: image size (0 when the file gives none).
        names: N canonical class names.
        boxes: float32 [N, 4] as written.
        difficult: bool [N].
    """

    width: int
    height: int
    names: list[str]
    boxes: np.ndarray
    difficult: np.ndarray


def cache_root() -> Path | None:
    """The cache folder (see the module docstring); None when ``ORE_CACHE_DIR=off``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip():
        return None if value.strip().lower() == "off" else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ore"


class AnnotationCache:
    """The cache of one annotation folder.

    Args:
        folder: the folder of the XML files (e.g. ``<root>/Annotations``).
        root: the cache folder (default :func:`cache_root`); None: nothing is cached.
    """

    def __init__(self, folder: str | Path, root: Path | None = None):
        root = cache_root() if root is None else root
        key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:20]
        self.path = None if root is None else root / "annotations" / f"voc-{key}.npz"
        self._entries: dict[str, tuple[int, int, RawAnnotation]] = {}
        self._dirty = False
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                a = {k: z[k] for k in _ARRAYS}
            if int(a["version"]) != VERSION:
                self._dirty = True
                return
            entries = _unpack(a)
        except (OSError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile,
                EOFError) as exc:
            log.warning("annotation cache %s is unreadable (%s: %s); rebuilding it", self.path,
                        type(exc).__name__, str(exc)[:80])
            self._dirty = True
            return
        self._entries = entries

    def lookup(self, name: str, stat: os.stat_result) -> RawAnnotation | None:
        """The entry of file ``name`` if its size and modification time still match."""
        entry = self._entries.get(name)
        if entry is None or entry[0] != stat.st_size or entry[1] != stat.st_mtime_ns:
            return None
        return entry[2]

    def store(self, name: str, stat: os.stat_result, raw: RawAnnotation) -> None:
        if self.path is None or stat.st_mtime_ns > time.time_ns() - SETTLE_NS:
            return
        self._entries[name] = (stat.st_size, stat.st_mtime_ns, raw)
        self._dirty = True

    def save(self) -> None:
        """Write the cache (to a temporary name, then renamed) if anything changed."""
        if self.path is None or not self._dirty:
            return
        arrays = _pack(self._entries)
        try:
            atomic_write(self.path, lambda f: np.savez(f, **arrays))
        except (OreError, OSError) as exc:
            if self.path not in _unwritable:
                _unwritable.add(self.path)
                log.warning("cannot write annotation cache %s (%s); set %s to another folder "
                            "or to 'off'", self.path, exc, CACHE_ENV)
            return
        self._dirty = False


def _pack(entries: dict[str, tuple[int, int, RawAnnotation]]) -> dict[str, np.ndarray]:
    files = list(entries)
    raws = [entries[f][2] for f in files]
    counts = np.fromiter((len(r.names) for r in raws), np.int64, len(raws))
    classes = sorted({n for r in raws for n in r.names})
    index_of = {c: i for i, c in enumerate(classes)}
    boxes = [r.boxes for r in raws if len(r.names)]
    difficult = [r.difficult for r in raws if len(r.names)]
    return {
        "version": np.asarray(VERSION, np.int64),
        "files": np.asarray(files, dtype=np.str_).reshape(-1),
        "size": np.asarray([entries[f][0] for f in files], np.int64).reshape(-1),
        "mtime_ns": np.asarray([entries[f][1] for f in files], np.int64).reshape(-1),
        "width": np.asarray([r.width for r in raws], np.int64).reshape(-1),
        "height": np.asarray([r.height for r in raws], np.int64).reshape(-1),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "boxes": (np.concatenate(boxes) if boxes else np.zeros((0, 4))).astype(np.float32),
        "difficult": (np.concatenate(difficult) if difficult else np.zeros(0)).astype(bool),
        "classes": np.asarray(classes, dtype=np.str_).reshape(-1),
        "class_index": np.fromiter((index_of[n] for r in raws for n in r.names), np.int64,
                                   int(counts.sum())),
    }


def _unpack(a: dict[str, np.ndarray]) -> dict[str, tuple[int, int, RawAnnotation]]:
    """Entries from the arrays of a cache file; ValueError when they do not fit together."""
    files = a["files"]
    f = len(files)
    n = int(a["offsets"][-1]) if len(a["offsets"]) else -1
    if (files.ndim != 1 or files.dtype.kind != "U"
            or any(len(a[k]) != f for k in ("size", "mtime_ns", "width", "height"))
            or a["offsets"].shape != (f + 1,) or a["offsets"][0] != 0
            or (np.diff(a["offsets"]) < 0).any() or a["boxes"].shape != (n, 4)
            or a["difficult"].shape != (n,) or a["class_index"].shape != (n,)
            or a["classes"].dtype.kind != "U" or a["boxes"].dtype != np.float32
            or a["difficult"].dtype != bool
            or (n and not (0 <= a["class_index"].min() <= a["class_index"].max()
                           < len(a["classes"])))):
        raise ValueError("arrays do not fit together")
    classes = a["classes"].tolist()
    names = [classes[i] for i in a["class_index"].tolist()]
    offsets = a["offsets"].tolist()
    boxes, difficult = a["boxes"], a["difficult"]
    out = {}
    for i, (name, size, mtime, w, h) in enumerate(zip(
            files.tolist(), a["size"].tolist(), a["mtime_ns"].tolist(), a["width"].tolist(),
            a["height"].tolist())):
        lo, hi = offsets[i], offsets[i + 1]
        out[name] = (size, mtime, RawAnnotation(w, h, names[lo:hi], boxes[lo:hi],
                                                difficult[lo:hi]))
    return out
