"""``ore detect`` on many images: config overrides, a bad image skipped and listed, and a
pixel limit checked from the header before an image is decoded."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from ore.cli import main
from ore.config import load_config
from ore.data.classes import load_task_split
from ore.data.dataset import BadImage, DetectionDataset
from ore.data.records import ImageRecord
from tests.reliability import save_untrained_weights, user_error

SMALL = ["INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=96"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_untrained_weights(tmp_path_factory.mktemp("w") / "model_final.pth")


def grey_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black greyscale PNG, written row by row: 12000×12000 takes ~140 KB on
    disk and 432 MB once decoded to RGB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    pack = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def detect(weights: Path, output: Path, *inputs) -> list:
    return ["detect", "--config", "toy/t1_train.yaml", "--weights", weights, *inputs,
            "--output", output, *SMALL]


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(capsys, tmp_path, weights,
                                                                  toy_root):
    huge = grey_png(tmp_path / "black.png", 12000, 12000)
    assert huge.stat().st_size < 1_000_000
    reason = "12000×12000 pixels (144.0 Mpx) is over INPUT.MAX_PIXELS=64000000"
    msg = user_error(capsys, detect(weights, tmp_path / "det", huge))
    assert msg == f"error: no readable image among the 1 inputs ({huge}: {reason})"
    assert not (tmp_path / "det").exists()
    # The same limit guards training and evaluation: the image is a bad image there.
    cfg = load_config("toy/t1_train.yaml")
    record = ImageRecord("black", str(huge), 12000, 12000)
    item = DetectionDataset([record], load_task_split("toy"),
                            max_pixels=cfg.INPUT.MAX_PIXELS)[0]
    assert isinstance(item, BadImage) and item.reason == reason
    # The limit is a config key: lowered, it refuses an ordinary toy image.
    image = next((toy_root / "JPEGImages").glob("*.jpg"))
    msg = user_error(capsys, detect(weights, tmp_path / "det", image, "INPUT.MAX_PIXELS=100"))
    assert "is over INPUT.MAX_PIXELS=100" in msg and str(image) in msg


def test_detect_takes_overrides_and_skips_a_bad_image_among_many(capsys, caplog, tmp_path,
                                                                 weights, toy_root):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    good = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:2]
    a, c = (shutil.copy(p, imgs / f"{name}.jpg") for p, name in zip(good, "ac"))
    (imgs / "b.jpg").write_bytes(Path(a).read_bytes()[:300])  # truncated
    out = tmp_path / "det"
    with caplog.at_level(logging.WARNING):
        rc = main([str(x) for x in detect(weights, out, imgs, "--score-thresh", "0",
                                          "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE=2",
                                          "DATALOADER.SKIP_BAD_IMAGES=false")])
    assert rc == 0
    records = json.loads((out / "detections.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["a.jpg", "b.jpg", "c.jpg"]
    bad = records[1]
    assert bad["error"] == "missing or not a decodable image" and bad["drawn"] is None
    assert bad["boxes"] == bad["labels"] == bad["scores"] == []
    assert all("error" not in r and (out / r["drawn"]).is_file() for r in (records[0],
                                                                           records[2]))
    assert 0 < max(len(r["boxes"]) for r in records) <= 2  # the override took effect
    assert any(f"skipping {imgs / 'b.jpg'}" in r.getMessage() for r in caplog.records)
    assert "1 unreadable images skipped" in capsys.readouterr().out
    # The energy-based identifier is one override away (and checked as everywhere else).
    msg = user_error(capsys, detect(weights, tmp_path / "det2", imgs, "EBUI.ENABLED=true"))
    assert "EBUI.ENABLED is true but EBUI.FIT_FILE is empty" in msg
    assert np.isfinite([s for r in records for s in r["scores"]]).all()
