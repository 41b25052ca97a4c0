"""Shared fixtures: a small toy world, and the real VOC photos from the labelme sdist."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

LABELME = "labelme==6.3.1"
CACHE = Path(os.environ.get("ORE_TEST_CACHE", Path.home() / ".cache" / "ore-tests"))


@pytest.fixture(autouse=True, scope="session")
def _annotation_cache(tmp_path_factory):
    """Parsed annotations are cached in a folder of this test session, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ORE_CACHE_DIR", str(tmp_path_factory.mktemp("ore-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A toy world small enough to write in about a second (same layout as the default)."""
    from ore.data.toy import write_toy_world

    root = tmp_path_factory.mktemp("toy") / "world"
    return write_toy_world(root, seed=3, images_per_task=24, val_images=12, test_images=20,
                           exemplars_per_class=3)


@pytest.fixture(scope="session")
def labelme_examples() -> Path:
    """``examples/`` of the labelme source archive: 3 PASCAL VOC 2011 photos, VOC XML + COCO.

    Downloaded once with ``pip download`` into a cache; skipped when the registry is
    unreachable.
    """
    target = CACHE / "labelme-6.3.1" / "examples"
    if not target.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             LABELME, "-d", str(CACHE), "--quiet"],
            capture_output=True, text=True, timeout=300,
        )
        archive = CACHE / "labelme-6.3.1.tar.gz"
        if proc.returncode != 0 or not archive.is_file():
            pytest.skip(f"cannot download {LABELME} (offline?): {proc.stderr.strip()[-200:]}")
        with tarfile.open(archive) as tar:
            wanted = ("labelme-6.3.1/examples/bbox_detection/data_dataset_voc",
                      "labelme-6.3.1/examples/instance_segmentation/data_dataset_coco")
            members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
            tar.extractall(CACHE, members=members, filter="data")
    return target
