"""Fuzzing the readers of user files: any input gives a record or an OreError, never a
traceback of another kind."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ore.data.classes import BUILTIN_SPLITS
from ore.data.records import ImageRecord, parse_voc_xml
from ore.errors import OreError
from ore.evaluation.detections import parse_detections, read_detections

TOY = BUILTIN_SPLITS["toy"]
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
_DIR = Path(tempfile.mkdtemp(prefix="ore-fuzz-"))

# Values that break naive number parsing.
numbers_as_text = st.one_of(
    st.sampled_from(["", " ", "inf", "-inf", "nan", "1e999", "-1e999", "0x10", "1,5", "½",
                     "12abc", "9" * 400, "-0", "1e-400", "None"]),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=8),
)
names = st.one_of(st.sampled_from(["circle", "square", "unknown", "Circle ", "dragon", ""]),
                  st.text(max_size=12))


def _element(tag: str, text: str) -> str:
    escaped = text.replace("&", "&amp;").replace("<", "&lt;")
    return f"<{tag}>{escaped}</{tag}>"


@st.composite
def voc_documents(draw) -> str:
    """Mostly well-formed VOC XML with hostile values, sometimes cut or mangled."""
    parts = ["<annotation>"]
    if draw(st.booleans()):
        parts.append("<size>" + _element("width", draw(numbers_as_text))
                     + _element("height", draw(numbers_as_text)) + "<depth>3</depth></size>")
    for _ in range(draw(st.integers(0, 3))):
        obj = ["<object>"]
        if draw(st.integers(0, 9)):
            obj.append(_element("name", draw(names)))
        if draw(st.integers(0, 9)):
            obj.append(_element("difficult", draw(st.sampled_from(["0", "1", "", "x", "true"]))))
        if draw(st.integers(0, 9)):
            coords = [_element(t, draw(numbers_as_text)) for t in ("xmin", "ymin", "xmax", "ymax")]
            obj.append("<bndbox>" + "".join(draw(st.permutations(coords))[:draw(
                st.integers(2, 4))]) + "</bndbox>")
        obj.append("</object>")
        parts.append("".join(obj))
    parts.append("</annotation>")
    doc = "".join(parts)
    mangle = draw(st.integers(0, 5))
    if mangle == 0:
        doc = doc[: draw(st.integers(0, len(doc)))]  # truncated
    elif mangle == 1:
        doc = draw(st.text(max_size=40)) + doc  # junk before the root
    return doc


def _check_xml(data: bytes) -> None:
    path = _DIR / "a.xml"
    path.write_bytes(data)
    try:
        record = parse_voc_xml(path, _DIR / "a.jpg", TOY)
    except OreError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(record, ImageRecord)
    assert record.boxes.shape == (len(record.names), 4) == (len(record.difficult), 4)
    if record.width > 0 and record.height > 0 and len(record.boxes):
        assert (record.boxes[:, 2] >= record.boxes[:, 0]).all()


@FUZZ
@given(voc_documents())
def test_voc_xml_reader_never_raises_anything_but_ore_error(doc):
    _check_xml(doc.encode())


@FUZZ
@given(st.binary(max_size=200))
def test_voc_xml_reader_on_arbitrary_bytes(data):
    _check_xml(data)


def test_voc_xml_reader_on_hostile_documents():
    for doc in [
        '<?xml version="1.0" encoding="no-such-codec"?><annotation/>',
        '<?xml version="1.0" encoding="utf-16"?><annotation/>',
        "<annotation><size><width>1e999</width><height>5</height></size></annotation>",
        "<annotation>" + "<a>" * 5000 + "</a>" * 5000 + "</annotation>",
        '<!DOCTYPE a [<!ENTITY x "xxxxxxxxxx"><!ENTITY y "&x;&x;&x;&x;&x;&x;&x;&x;&x;&x;">'
        '<!ENTITY z "&y;&y;&y;&y;&y;&y;&y;&y;&y;&y;">]><annotation><object><name>&z;</name>'
        "</object></annotation>",
        '<!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><annotation>'
        "<object><name>&e;</name></object></annotation>",
    ]:
        _check_xml(doc.encode())


# --- detections files -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
scalars = st.one_of(st.integers(-10**30, 10**30), st.floats(), st.none(), st.booleans(),
                    st.text(max_size=6))
entries = st.fixed_dictionaries(
    {},
    optional={
        "image_id": st.one_of(st.sampled_from(["000001", ""]), scalars),
        "category": st.one_of(st.sampled_from(["circle", "unknown", "dragon", "Circle"]),
                              scalars),
        "score": st.one_of(st.floats(), scalars),
        "bbox": st.one_of(st.lists(st.one_of(st.floats(), st.integers(-10**400, 10**400)),
                                   max_size=5), json_values),
    },
)


def _check_detections(value) -> None:
    try:
        out = parse_detections(value, TOY, where="fuzz")
    except OreError as exc:
        assert "\n" not in str(exc)
        return
    n = len(out["image_ids"])
    assert out["labels"].shape == (n,) and out["scores"].shape == (n,)
    assert out["boxes"].shape == (n, 4)


@FUZZ
@given(st.lists(st.one_of(entries, json_values), max_size=6))
def test_detections_parser_never_raises_anything_but_ore_error(value):
    _check_detections(value)


@FUZZ
@given(json_values)
def test_detections_parser_on_any_json_value(value):
    _check_detections(value)


@FUZZ
@given(st.one_of(st.binary(max_size=120),
                 st.lists(entries, max_size=4).map(lambda e: json.dumps(e).encode())))
def test_detections_file_reader_on_arbitrary_bytes(data):
    path = _DIR / "d.json"
    path.write_bytes(data)
    try:
        read_detections(path, TOY)
    except OreError as exc:
        assert "\n" not in str(exc)


def _deep_json(path: Path) -> Path:
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def test_coco_reader_on_absurdly_nested_json():
    from ore.data.records import load_coco_json

    with pytest.raises(OreError, match=r"not a COCO instances file \(RecursionError"):
        load_coco_json(_deep_json(_DIR / "deep.json"), _DIR, TOY)


def test_detections_reader_on_absurdly_nested_json():
    with pytest.raises(OreError, match="nested too deeply"):
        read_detections(_deep_json(_DIR / "deep.json"), TOY)
