"""The annotation cache: hits give the records a fresh parse gives, changed files are
parsed again, a corrupt cache file is rebuilt, listed repeats survive."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

from ore.data import records as records_module
from ore.data.annotation_cache import AnnotationCache, cache_root
from ore.data.classes import load_task_split
from ore.data.records import as_listed, load_voc_split
from ore.errors import OreError

TOY = load_task_split("toy")
OWOD = load_task_split("owod")
OBJECTS = {  # name, box, difficult; image 100 x 80
    "a": [("circle", (1, 1, 20, 20), 0), ("Square", (50, 10, 130, 40), 1)],  # clipped
    "b": [("star", (30, 30, 20, 40), 0), ("spiral", (5, 5, 9, 9), 0)],  # degenerate first
    "c": [],
    "d.1": [("cross", (2.5, 3, 7.25, 8), 0)],
}
LIST = "a\nb\nc\nd.1\na\n"  # a is listed twice


def _xml(objects) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects)
    return f"<annotation><size><width>100</width><height>80</height></size>{objs}</annotation>"


def _age(path, seconds=3600):
    """Date a file back, as a dataset at rest (fresh files are never stored)."""
    t = time.time_ns() - seconds * 1_000_000_000
    os.utime(path, ns=(t, t))


@pytest.fixture
def voc(tmp_path, monkeypatch):
    monkeypatch.setenv("ORE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for name, objects in OBJECTS.items():
        (root / "Annotations" / f"{name}.xml").write_text(_xml(objects))
        _age(root / "Annotations" / f"{name}.xml")
        (root / "JPEGImages" / f"{name}.jpg").touch()
    (root / "ImageSets/Main/s.txt").write_text(LIST)
    return root


@pytest.fixture
def parses(monkeypatch):
    """The names of the files parsed from XML (not taken from the cache)."""
    seen = []
    real = records_module._read_voc_xml

    def counting(path, *args, **kwargs):
        seen.append(path.stem)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(records_module, "_read_voc_xml", counting)
    return seen


def _key(r):
    return (r.image_id, r.file_name, r.width, r.height, r.boxes.dtype, r.boxes.tolist(),
            r.names, r.difficult.dtype, r.difficult.tolist())


def _uncached(root, split=TOY, name="s"):
    old = os.environ["ORE_CACHE_DIR"]
    os.environ["ORE_CACHE_DIR"] = "off"
    try:
        return load_voc_split(root, name, split)
    finally:
        os.environ["ORE_CACHE_DIR"] = old


def _cache_file(root):
    return AnnotationCache(root / "Annotations").path


def test_cache_location_and_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ORE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("ORE_CACHE_DIR", "off")
    assert cache_root() is None and AnnotationCache(tmp_path).path is None
    monkeypatch.delenv("ORE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "ore"


def test_miss_then_hit_gives_the_same_records(voc, parses, caplog):
    with caplog.at_level(logging.WARNING):
        cold = load_voc_split(voc, "s", TOY)
    assert sorted(parses) == sorted(OBJECTS) and _cache_file(voc).is_file()
    cold_log = caplog.text
    assert "1 boxes extended past the image" in cold_log and "1 degenerate boxes" in cold_log
    parses.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warm = load_voc_split(voc, "s", TOY)
    assert parses == []  # every file from the cache
    assert caplog.text == cold_log  # the same repairs counted
    reference = _uncached(voc)
    assert [_key(r) for r in warm] == [_key(r) for r in cold] == [_key(r) for r in reference]
    a = warm[0]
    assert a.names == ["circle", "square"] and a.boxes.tolist()[1] == [50, 10, 100, 40]
    assert warm[1].names == ["spiral"]  # the degenerate star was dropped
    assert warm[3].boxes.tolist() == [[2.5, 3, 7.25, 8]]
    # The list's repeat survives: the cache holds files, the list is read line by line.
    listed = as_listed(warm, voc, "s")
    assert [r.image_id for r in listed] == ["a", "b", "c", "d.1", "a"]
    assert _key(listed[4]) == _key(reference[0])


def test_touched_or_rewritten_file_is_parsed_again(voc, parses):
    load_voc_split(voc, "s", TOY)
    parses.clear()
    _age(voc / "Annotations/b.xml", 60)  # only its time changes
    again = load_voc_split(voc, "s", TOY)
    assert parses == ["b"]
    assert [_key(r) for r in again] == [_key(r) for r in _uncached(voc)]
    parses.clear()
    # Same size, other content, older time: a new mtime all the same.
    path = voc / "Annotations/a.xml"
    path.write_text(path.read_text().replace("circle", "blobby"))
    _age(path, 120)
    with pytest.raises(OreError, match=r"a\.xml: class 'blobby' is in no task of split toy"):
        load_voc_split(voc, "s", TOY)
    path.write_text(path.read_text().replace("blobby", "circle"))
    _age(path, 100)
    parses.clear()
    records = load_voc_split(voc, "s", TOY)
    assert parses == ["a"]
    assert [_key(r) for r in records] == [_key(r) for r in _uncached(voc)]


def test_fresh_files_are_parsed_until_they_settle(voc, parses):
    (voc / "Annotations/c.xml").write_text(_xml([("star", (1, 1, 5, 5), 0)]))  # just now
    load_voc_split(voc, "s", TOY)
    parses.clear()
    records = load_voc_split(voc, "s", TOY)
    assert parses == ["c"] and records[2].names == ["star"]


def test_corrupt_cache_is_warned_about_and_rebuilt(voc, parses, caplog):
    load_voc_split(voc, "s", TOY)
    path = _cache_file(voc)
    for garbage in (b"not a zip at all", path.read_bytes()[:200]):
        path.write_bytes(garbage)
        parses.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ore.data.annotation_cache"):
            records = load_voc_split(voc, "s", TOY)
        lines = [r.getMessage() for r in caplog.records if r.name.endswith("annotation_cache")]
        assert len(lines) == 1 and "is unreadable" in lines[0] and "rebuilding" in lines[0]
        assert "\n" not in lines[0]
        assert sorted(parses) == sorted(OBJECTS)
        assert [_key(r) for r in records] == [_key(r) for r in _uncached(voc)]
        with np.load(path, allow_pickle=False) as z:  # rewritten whole
            assert sorted(z["files"].tolist()) == sorted(f"{n}.xml" for n in OBJECTS)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    parses.clear()
    load_voc_split(voc, "s", TOY)
    assert parses == []


def test_inconsistent_cache_arrays_are_rebuilt(voc, parses, caplog):
    load_voc_split(voc, "s", TOY)
    path = _cache_file(voc)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["offsets"] = arrays["offsets"][:-1]
    np.savez(path, **arrays)
    parses.clear()
    with caplog.at_level(logging.WARNING):
        records = load_voc_split(voc, "s", TOY)
    assert "unreadable" in caplog.text and sorted(parses) == sorted(OBJECTS)
    assert [_key(r) for r in records] == [_key(r) for r in _uncached(voc)]


def test_cached_class_unknown_to_another_split_is_the_same_error(voc):
    load_voc_split(voc, "s", TOY)  # cached under the toy split
    with pytest.raises(OreError) as cached:
        load_voc_split(voc, "s", OWOD)
    with pytest.raises(OreError) as fresh:
        _uncached(voc, OWOD)
    assert str(cached.value) == str(fresh.value)
    assert "class 'circle' is in no task of split owod" in str(cached.value)


def test_unwritable_cache_folder_warns_and_loads(voc, tmp_path, monkeypatch, caplog):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ORE_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    with caplog.at_level(logging.WARNING):
        records = load_voc_split(voc, "s", TOY)
    assert "cannot write annotation cache" in caplog.text and "ORE_CACHE_DIR" in caplog.text
    assert [_key(r) for r in records] == [_key(r) for r in _uncached(voc)]
