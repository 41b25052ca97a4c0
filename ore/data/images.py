"""Image files: the one list of extensions, finding images in folders, reading them.

:func:`collect_images` gathers what a user names on the command line (files and
folders); :func:`load_image_folder` reads a whole folder tree into one uint8 tensor
[n, 3, S, S] (an :class:`ImageSet`), the form backbone pretraining trains on: pretraining
images are small, and batched augmentation of an in-memory tensor is much faster on a
CPU than a data loader decoding files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ore.errors import OreError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class ImageSet:
    """images: uint8 [n, C, H, W]; labels: int64 [n] or None."""

    images: torch.Tensor
    labels: torch.Tensor | None = None


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly, and those directly inside named folders (sorted)."""
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if is_image_file(q))
            if not found:
                raise OreError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
            paths += found
        elif p.is_file():
            paths.append(p)
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
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise OreError(f"--images: cannot decode {path}")
        interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
        out[i] = cv2.resize(img, (size, size), interpolation=interp)[:, :, ::-1]  # BGR→RGB
    return ImageSet(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous())
