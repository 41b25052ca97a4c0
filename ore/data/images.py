"""Image files: the one list of extensions, finding images in folders, reading them.

:func:`decode_image` reads one image, refusing one larger than a pixel limit from its
header before any pixel is decoded (a small PNG can hold a 30000×30000 image that would
take tens of GB decoded). :func:`collect_images` gathers what a user names on the command
line (files, folders, globs; images and videos); :func:`load_image_folder` reads a whole
folder tree into one uint8 tensor [n, 3, S, S] (an :class:`ImageSet`), the form backbone
pretraining trains on: pretraining images are small, and batched augmentation of an
in-memory tensor is much faster on a CPU than a data loader decoding files.
"""

from __future__ import annotations

import glob
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from ore.errors import OreError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# Videos are read frame by frame through OpenCV.
VIDEO_EXTENSIONS = (".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


class UnreadableImage(OreError):
    """An image file that is missing, cannot be decoded, or is over the pixel limit."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = str(path), reason


def header_pixels(path: str | Path) -> tuple[int, str] | None:
    """(pixel count, size as text) read from the file's header alone, without decoding;
    None when the header is not one PIL knows (the decoder then has the last word)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
        return w * h, f"{w}×{h}"
    except Image.DecompressionBombError as exc:  # over PIL's own limit; it names the count
        m = re.search(r"\((\d+) pixels\)", str(exc))
        return (int(m.group(1)), f"{int(m.group(1))} pixels") if m else None
    except Exception:  # noqa: BLE001 - not PIL's format, truncated, …: cv2 decides below
        return None


def decode_image(path: str | Path, max_pixels: int = 0) -> np.ndarray:
    """uint8 RGB [H, W, 3] of the image file ``path``.

    Args:
        max_pixels: refuse an image with more pixels than this (0: no limit), checked
            from the header before decoding (``INPUT.MAX_PIXELS``).
    Raises:
        UnreadableImage: the file is missing, not a decodable image, or over the limit.
    """
    if max_pixels > 0:
        found = header_pixels(path)
        if found is not None and found[0] > max_pixels:
            raise UnreadableImage(path, f"{found[1]} pixels ({found[0] / 1e6:.1f} Mpx) is "
                                        f"over INPUT.MAX_PIXELS={max_pixels}")
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError:
        data = None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        raise UnreadableImage(path, "missing or not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@dataclass
class ImageSet:
    """images: uint8 [n, C, H, W]; labels: int64 [n] or None."""

    images: torch.Tensor
    labels: torch.Tensor | None = None


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _media_in(folder: Path) -> list[Path]:
    return sorted(q for q in folder.rglob("*")
                  if q.is_file() and (is_image_file(q) or is_video_file(q)))


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """What a user names on the command line, as files in order: image and video files
    named directly, those anywhere under a named folder (sorted), and the matches of a
    glob pattern (``photos/*.jpg``, ``**/*.png``; sorted). A name that is none of these,
    a folder without images or videos and a pattern matching nothing are errors."""
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = _media_in(p)
            if not found:
                raise OreError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) or videos "
                               f"({', '.join(VIDEO_EXTENSIONS)}) in folder {p}")
            paths += found
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True))
            found = [m for m in matches if m.is_file() and (is_image_file(m) or is_video_file(m))]
            if not found:
                raise OreError(f"input {raw}: the pattern matches no image or video file")
            paths += found
        else:
            raise OreError(f"input not found: {p}")
    return paths


def load_image_folder(root: str | Path, size: int) -> ImageSet:
    """Every image under ``root`` (recursively), resized to size×size RGB, unlabelled."""
    root = Path(root)
    if not root.is_dir():
        raise OreError(f"--images: not a directory: {root}")
    files = sorted(p for p in root.rglob("*") if is_image_file(p))
    if not files:
        raise OreError(f"--images: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")

    def read(path: Path) -> np.ndarray:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise OreError(f"--images: cannot decode {path}")
        return img[:, :, ::-1]  # BGR→RGB

    return resized_image_set(files, size, read)


def resized_image_set(items: list, size: int, read) -> ImageSet:
    """The images of ``items`` (paths, ids…) read by ``read`` (item → RGB uint8 [H, W, 3],
    an :class:`OreError` when it cannot), in order, resized to size×size, unlabelled."""
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for i, item in enumerate(items):
        img = read(item)
        interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
        out[i] = cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=interp)
    return ImageSet(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous())
