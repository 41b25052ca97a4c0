"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, read from its idx files.

Loaded once into a uint8 tensor [n, 1, 28, 28] with int64 labels (an :class:`ImageSet`),
the form backbone pretraining trains on.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ore.data.images import ImageSet
from ore.errors import OreError

# Where `apt-get install dataset-fashion-mnist` puts the four idx files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise OreError(f"cannot read {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise OreError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise OreError(f"{path}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def fashion_mnist_available(root: Path = FASHION_MNIST_DIR) -> bool:
    return all((root / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair)


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST_DIR) -> ImageSet:
    """The train (60k) or test (10k) split as uint8 [n, 1, 28, 28] with labels."""
    root = Path(root)
    if split not in FASHION_MNIST_FILES:
        raise OreError(f"unknown Fashion-MNIST split {split!r}; expected train or test")
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    for name in (img_name, lbl_name):
        if not (root / name).is_file():
            raise OreError(
                f"Fashion-MNIST file not found: {root / name} "
                "(install it with `apt-get install dataset-fashion-mnist`)"
            )
    images = read_idx(root / img_name)
    labels = read_idx(root / lbl_name)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise OreError(f"{root}: unexpected idx shapes {images.shape}, {labels.shape}")
    return ImageSet(
        torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))
    )
