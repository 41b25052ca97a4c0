"""Images and targets for the detector, transforms, and the batch sampler.

Training-time scale augmentation (shortest side drawn from a range, capped longest side)
and flips happen here, in the loader's workers; the model resizes only at inference so
that detections come back in the input image's pixel coordinates.

Every random choice of an item depends only on ``(seed, epoch, position)``, never on the
worker that loads it, so a run is reproducible and a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ore.data.classes import TaskSplit
from ore.data.images import UnreadableImage, decode_image
from ore.data.records import ImageRecord
from ore.errors import OreError

log = logging.getLogger(__name__)


@dataclass
class BadImage:
    """Returned in place of an item whose image cannot be decoded; the caller decides."""

    path: str
    reason: str


def read_image_rgb(path: str, max_pixels: int = 0) -> np.ndarray | None:
    """uint8 RGB [H, W, 3], or None when the file is missing, cannot be decoded or has
    more than ``max_pixels`` pixels (0: no limit)."""
    try:
        return decode_image(path, max_pixels)
    except UnreadableImage:
        return None


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] → float [3, H, W] in 0..1."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


@dataclass
class TrainTransform:
    """Shortest side uniform in ``[min_size[0], min_size[-1]]``, longest side ≤ ``max_size``,
    horizontal flip with probability ``flip_prob``."""

    min_size: tuple[int, int]
    max_size: int
    flip_prob: float = 0.5

    def __call__(
        self, img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w = img.shape[:2]
        short = rng.integers(self.min_size[0], self.min_size[-1] + 1)
        scale = min(short / min(h, w), self.max_size / max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
            boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
        if rng.random() < self.flip_prob:
            img = img[:, ::-1]
            boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
        return img, boxes


def voc_to_model_boxes(boxes: np.ndarray) -> np.ndarray:
    """VOC 1-based inclusive corners → 0-based continuous corners (xmin−1, ymin−1)."""
    out = boxes.astype(np.float32, copy=True)
    out[:, :2] -= 1.0
    return out


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based boxes [N, 4] clipped to a width × height image, and the keep mask [N] of
    those with an area left."""
    out = np.empty_like(boxes)
    out[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    out[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], keep


class DetectionDataset(Dataset):
    """Items are ``(image [3,H,W] float, target, meta)`` or a :class:`BadImage`.

    ``target`` holds float32 ``boxes`` [N, 4] (0-based, in the returned image's pixels)
    and int64 ``labels`` [N]; ``meta`` the ``image_id``, the annotation's size
    (``height``, ``width``), the decoded image's (``decoded_size``, (H, W)) and
    ``size_mismatch`` when the two differ: the boxes are then clipped to the decoded image
    (objects left outside it are dropped) and the caller warns
    (:func:`note_size_mismatches`).
    Indices are ``(index, seed)`` pairs from :class:`TrainBatchSampler` in training, or
    plain ints (no augmentation) for evaluation. An image with more than ``max_pixels``
    pixels (0: no limit; ``INPUT.MAX_PIXELS``) is a :class:`BadImage`, refused before it
    is decoded.
    """

    def __init__(
        self, records: list[ImageRecord], split: TaskSplit, transform: TrainTransform | None = None,
        *, max_pixels: int = 0,
    ):
        self.records = records
        self.split = split
        self.transform = transform
        self.max_pixels = max_pixels
        # Labels are resolved once here, not per item.
        self.labels = [
            np.asarray([split.label(n) for n in r.names], np.int64) for r in records
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        r = self.records[index]
        try:
            img = decode_image(r.file_name, self.max_pixels)
        except UnreadableImage as exc:
            return BadImage(r.file_name, exc.reason)
        h, w = img.shape[:2]
        boxes, labels = voc_to_model_boxes(r.boxes), self.labels[index]
        # The annotation's boxes were clipped to its own <size>; a file of another size
        # gets them clipped to its real pixels.
        mismatch = r.width > 0 and r.height > 0 and (r.height, r.width) != (h, w)
        if mismatch:
            boxes, keep = clip_boxes(boxes, w, h)
            labels = labels[keep]
        if self.transform is not None:
            img, boxes = self.transform(img, boxes, np.random.default_rng(seed))
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(labels),
        }
        meta = {"image_id": r.image_id, "height": r.height, "width": r.width,
                "file_name": r.file_name, "decoded_size": (h, w), "size_mismatch": mismatch}
        return image_to_tensor(img), target, meta

    def aspect_groups(self) -> np.ndarray:
        """0 for landscape (w ≥ h) images, 1 for portrait, from the annotation sizes."""
        return np.asarray([int(r.height > r.width) for r in self.records], np.int64)


class TrainBatchSampler(Sampler):
    """An endless stream of batches of ``(index, seed)`` pairs.

    Each epoch is a seeded permutation; with ``world_size`` > 1 every process takes its
    own share. With grouping, a batch holds only landscape or only portrait images.
    ``start_iter`` skips the batches a resumed run has already seen (index arithmetic
    only; no image is loaded).
    """

    def __init__(
        self, groups: np.ndarray, batch_size: int, *, seed: int = 0, group: bool = True,
        rank: int = 0, world_size: int = 1, start_iter: int = 0,
    ):
        if batch_size < 1:
            raise OreError(f"batch size per process must be ≥ 1, got {batch_size}")
        if len(groups) == 0:
            raise OreError("the training set is empty after filtering")
        self.groups = np.asarray(groups) if group else np.zeros(len(groups), np.int64)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter

    def _batches(self) -> Iterator[list[tuple[int, int]]]:
        buckets: dict[int, list[tuple[int, int]]] = {}
        epoch = 0
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
            perm = np.resize(perm, math.ceil(len(perm) / self.world_size) * self.world_size)
            mine = perm[self.rank :: self.world_size]
            seeds = np.random.default_rng([self.seed, epoch, 1 + self.rank]).integers(
                0, 2**31, len(mine)
            )
            for i, s in zip(mine.tolist(), seeds.tolist()):
                bucket = buckets.setdefault(int(self.groups[i]), [])
                bucket.append((i, s))
                if len(bucket) == self.batch_size:
                    yield bucket
                    buckets[int(self.groups[i])] = []
            epoch += 1

    def __iter__(self):
        it = self._batches()
        for _ in range(self.start_iter):
            next(it)
        yield from it

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**31


def collate(batch: list) -> list:
    return batch


def _worker_init(_worker_id: int) -> None:
    # Workers decode one image at a time; extra threads only fight the main process.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def make_train_loader(
    dataset: DetectionDataset, batch_size: int, *, num_workers: int, seed: int,
    group: bool = True, rank: int = 0, world_size: int = 1, start_iter: int = 0,
) -> DataLoader:
    sampler = TrainBatchSampler(
        dataset.aspect_groups(), batch_size, seed=seed, group=group, rank=rank,
        world_size=world_size, start_iter=start_iter,
    )
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        persistent_workers=num_workers > 0, worker_init_fn=_worker_init,
    )


def make_test_loader(dataset: DetectionDataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate, worker_init_fn=_worker_init,
    )


def note_size_mismatches(batch: list, counter: dict, warned: set[str]) -> None:
    """Warn once per image whose decoded size differs from its annotation's, and keep
    their number in ``counter["size_mismatch"]`` (``warned``: the files already named)."""
    for _, _, meta in batch:
        if meta.get("size_mismatch") and meta["file_name"] not in warned:
            warned.add(meta["file_name"])
            h, w = meta["decoded_size"]
            log.warning("%s is %d×%d pixels but its annotation says %d×%d; its boxes are "
                        "clipped to the image", meta["file_name"], w, h, meta["width"],
                        meta["height"])
            counter["size_mismatch"] = len(warned)


def split_bad(batch: list, skip_bad: bool, counter: dict | None = None) -> list:
    """Drop :class:`BadImage` items with a warning, or stop with a one-line error."""
    good = []
    for item in batch:
        if isinstance(item, BadImage):
            if not skip_bad:
                raise OreError(f"cannot read image {item.path}: {item.reason} "
                               "(set DATALOADER.SKIP_BAD_IMAGES=true to skip such images)")
            log.warning("skipping unreadable image %s", item.path)
            if counter is not None:
                counter["bad_images"] = counter.get("bad_images", 0) + 1
            continue
        good.append(item)
    return good
