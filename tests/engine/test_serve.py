"""``ore serve``'s app through FastAPI's test client: an uploaded image gives its
detections.json record (with or without EBUI), and oversize or non-image uploads a 4xx
with a one-line reason."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ore.cli import parse_args
from ore.cli.detect import model_source
from ore.engine.inference import Predictor
from ore.engine.serve import build_app
from tests.cli.test_detect_run import write_stage


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    stage = write_stage(tmp_path_factory.mktemp("run") / "t1_ft", fit=True)
    args = parse_args(["serve", "--run", str(stage)])
    cfg, weights = model_source(args, args.overrides)
    predictor = Predictor(cfg, weights, score_thresh=0.0)
    return TestClient(build_app(predictor, max_upload_bytes=200_000))


@pytest.fixture(scope="module")
def image(toy_root) -> bytes:
    return sorted((toy_root / "JPEGImages").glob("*.jpg"))[0].read_bytes()


def test_an_upload_gives_its_record_with_and_without_ebui(client, image):
    r = client.post("/api/detect", files={"image": ("a.jpg", image, "image/jpeg")})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["image"] == "a.jpg" and rec["drawn"] is None
    assert 0 < len(rec["boxes"]) == len(rec["labels"]) == len(rec["energies"]) <= 3
    assert rec["height"] > 0 and all(b[0] <= b[2] <= rec["width"] for b in rec["boxes"])
    r = client.post("/api/detect?ebui=false", files={"image": ("a.jpg", image, "image/jpeg")})
    assert r.status_code == 200 and "energies" not in r.json()
    # The switch is per request: the next one has EBUI again.
    r = client.post("/api/detect", files={"image": ("a.jpg", image, "image/jpeg")})
    assert "energies" in r.json()


def test_bad_uploads_are_a_clear_4xx(client, image):
    r = client.post("/api/detect", files={"image": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "notes.txt: not a decodable image" in r.json()["detail"]
    r = client.post("/api/detect", files={"image": ("cut.jpg", image[:200], "image/jpeg")})
    assert r.status_code == 415
    r = client.post("/api/detect", files={"image": ("big.jpg", image * 200, "image/jpeg")})
    assert r.status_code == 413 and "over the upload limit of 200000" in r.json()["detail"]
    r = client.post("/api/detect", files={"image": ("huge.png", _grey_png(9000, 9000))})
    assert r.status_code == 413 and "INPUT.MAX_PIXELS" in r.json()["detail"]
    assert client.post("/api/detect").status_code == 422  # no file at all


def test_the_page_has_the_upload_slider_ebui_switch_and_table(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for part in ('type="file"', 'type="range"', 'id="ebui" checked', "<table", "/api/detect"):
        assert part in page
    assert client.get("/api/info").json()["ebui"] is True


def _grey_png(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    pack = zlib.compressobj(9)
    idat = b"".join(pack.compress(bytes(width + 1)) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def test_serve_refuses_bad_flags_before_loading(capsys, tmp_path: Path):
    from tests.reliability import user_error

    assert "--port 0" in user_error(capsys, ["serve", "--run", tmp_path, "--port", "0"])
    assert "not a folder" in user_error(capsys, ["serve", "--run", tmp_path / "nope"])
