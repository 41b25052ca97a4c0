"""Learning the whole-object score (:class:`ore.modeling.objectness.BoxObjectness`) from the
boxes a run was taught, and scoring candidate boxes with it.

Only labels the run already has are used: the objects of the known classes in the images
of its training lists, as its training stages saw them. From each labelled box of an image
(:func:`sample_boxes`):

- positives: the box itself and one jittered copy with IoU ≥ :data:`POSITIVE_IOU`;
- parts: up to :data:`PARTS_PER_BOX` jittered copies with IoU in :data:`PART_IOU` (a box
  that cuts through the object, or reaches past it into a neighbour);
- background: :data:`BACKGROUND_PER_IMAGE` random boxes overlapping no labelled object by
  IoU :data:`BACKGROUND_IOU` or more (an unlabelled object may sit in one: the score learns
  around such noise).

A jitter scales the width and height by factors in [0.3, 1.4] and moves the corner by up
to 0.6 of the size; each box draws :data:`JITTERS` of them at once and takes the first
that falls in each band. The network trains for ``steps`` AdamW steps on batches of
:data:`BATCH` crops under colour jitter, grayscale and small crops (class-agnostic: it
should not learn the known classes' colours), with binary cross-entropy.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou
from tqdm import tqdm

from ore.config import load_config
from ore.contrastive.augment import BatchAugment
from ore.data.classes import load_task_split
from ore.data.dataset import image_to_tensor, voc_to_model_boxes
from ore.data.images import UnreadableImage, decode_image
from ore.data.records import ImageRecord, load_dataset_split
from ore.engine.layout import CONFIG, RunLayout
from ore.errors import OreError
from ore.modeling.objectness import CROP_SIZE, BoxObjectness, crop_boxes

log = logging.getLogger(__name__)

POSITIVE_IOU = 0.75
PART_IOU = (0.1, 0.45)
BACKGROUND_IOU = 0.1
PARTS_PER_BOX = 2
BACKGROUND_PER_IMAGE = 3
JITTERS = 24
MIN_SIDE = 4.0  # labelled boxes smaller than this on a side are left out
STEPS = 3000
BATCH = 128
LR = 2e-3
WEIGHT_DECAY = 1e-4


def sample_boxes(gt: torch.Tensor, height: int, width: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training boxes of one image from its labelled boxes ``gt`` [g, 4] (0-based xyxy):
    (boxes [m, 4], labels [m] float, 1 for a whole object, 0 otherwise), as the module
    docstring describes."""
    gt = gt.float().reshape(-1, 4)
    gt = gt[((gt[:, 2:] - gt[:, :2]) >= MIN_SIDE).all(1)]
    g = len(gt)
    out_boxes, out_labels = [], []
    if g:
        wh = gt[:, 2:] - gt[:, :2]  # [g, 2]
        scale = torch.rand(g, JITTERS, 2, generator=generator) * 1.1 + 0.3
        shift = (torch.rand(g, JITTERS, 2, generator=generator) * 1.2 - 0.6) * wh[:, None]
        x1y1 = gt[:, None, :2] + shift
        cand = torch.cat([x1y1, x1y1 + scale * wh[:, None]], dim=2)  # [g, J, 4]
        iou = box_iou(cand.reshape(-1, 4), gt).reshape(g, JITTERS, g)
        own = iou[torch.arange(g), :, torch.arange(g)]  # [g, J] IoU with its own box
        pos = own >= POSITIVE_IOU
        part = (own >= PART_IOU[0]) & (own < PART_IOU[1])
        # The first positive and the first PARTS_PER_BOX parts of each box.
        first_pos = pos & (pos.cumsum(1) == 1)
        first_parts = part & (part.cumsum(1) <= PARTS_PER_BOX)
        out_boxes += [gt, cand[first_pos], cand[first_parts]]
        out_labels += [torch.ones(g), torch.ones(int(first_pos.sum())),
                       torch.zeros(int(first_parts.sum()))]
    n = BACKGROUND_PER_IMAGE * 4  # drawn, of which those clear of every object are kept
    size = torch.rand(n, 2, generator=generator) * 72 + 8
    size = torch.minimum(size, torch.tensor([width, height], dtype=torch.float32))
    corner = torch.rand(n, 2, generator=generator) * (
        torch.tensor([width, height], dtype=torch.float32) - size)
    bg = torch.cat([corner, corner + size], dim=1)
    if g:
        bg = bg[box_iou(bg, gt).max(1).values < BACKGROUND_IOU]
    bg = bg[:BACKGROUND_PER_IMAGE]
    out_boxes.append(bg)
    out_labels.append(torch.zeros(len(bg)))
    return torch.cat(out_boxes), torch.cat(out_labels)


def run_training_records(run: str | Path, up_to_task: int | None = None
                         ) -> list[ImageRecord]:
    """The labelled images of every training stage of ``run`` (``tN_train`` of an
    ``ore run-tasks`` folder, N ≤ ``up_to_task`` when given, or the ``ore train`` folder
    itself), as each stage saw them: its list, its task's classes. An image of several
    lists keeps every stage's boxes."""
    root = Path(run)
    layout = RunLayout(root)
    configs = [root / CONFIG] if (root / CONFIG).is_file() else []
    t = 1
    while (not (root / CONFIG).is_file() and (layout.stage_dir(t, "train") / CONFIG).is_file()
           and (up_to_task is None or t <= up_to_task)):
        configs.append(layout.stage_dir(t, "train") / CONFIG)
        t += 1
    if not configs:
        raise OreError(f"--run {run}: no {CONFIG} nor t1_train/{CONFIG}: no training labels "
                       "to learn the whole-object score from")
    by_file: dict[str, ImageRecord] = {}
    for path in configs:
        cfg = load_config(path)
        d = cfg.DATASETS
        split = load_task_split(d.CLASSES)
        for r in load_dataset_split(d, d.TRAIN, split, cfg.OWOD.TASK, d.TRAIN_ROLE):
            keep = np.array([n in split.classes for n in r.names], bool)
            r = r.select(keep)
            old = by_file.get(r.file_name)
            if old is not None:
                r = replace(old, boxes=np.concatenate([old.boxes, r.boxes]),
                            names=[*old.names, *r.names],
                            difficult=np.concatenate([old.difficult, r.difficult]))
            by_file[r.file_name] = r
    records = [r for r in by_file.values() if len(r.names)]
    if not records:
        raise OreError(f"--run {run}: its training lists label no object: no training "
                       "labels to learn the whole-object score from")
    return records


def collect_crops(records: list[ImageRecord], seed: int, max_pixels: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training crops of ``records`` (uint8 [m, 3, S, S]) and their labels [m]."""
    g = torch.Generator().manual_seed(seed)
    crops, labels = [], []
    for r in tqdm(records, desc="whole-object crops", unit="image"):
        try:
            img = decode_image(r.file_name, max_pixels)
        except UnreadableImage as exc:
            log.warning("skipping %s: %s", r.file_name, exc.reason)
            continue
        h, w = img.shape[:2]
        gt = torch.from_numpy(voc_to_model_boxes(r.boxes).astype(np.float32))
        boxes, y = sample_boxes(gt, h, w, g)
        c = crop_boxes(image_to_tensor(img), boxes)
        crops.append((c * 255).round().clamp(0, 255).to(torch.uint8))
        labels.append(y)
    if not crops:
        raise OreError("no training image of the run could be read for the whole-object "
                       "score")
    return torch.cat(crops), torch.cat(labels)


def train_objectness(records: list[ImageRecord], *, steps: int = STEPS, seed: int = 0,
                     max_pixels: int = 0) -> BoxObjectness:
    """The whole-object score learnt from ``records`` (module docstring), in eval mode.
    Deterministic for a seed on one thread; the global random state is left untouched."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    crops, labels = collect_crops(records, seed, max_pixels)
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        return _train(crops, labels, steps, seed)


def _train(crops: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> BoxObjectness:
    model = BoxObjectness()
    aug = BatchAugment(CROP_SIZE, scale=(0.85, 1.0), jitter=(0.6, 0.6, 0.6, 0.3),
                       jitter_prob=0.8, gray_prob=0.3)
    opt = torch.optim.AdamW(model.parameters(), LR, weight_decay=WEIGHT_DECAY)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(range(steps), desc="whole-object score", unit="step") as bar:
        for step in bar:
            pick = torch.randint(len(labels), (BATCH,), generator=g)
            x = aug(crops[pick].float() / 255)
            loss = F.binary_cross_entropy_with_logits(model(x), labels[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("whole-object score: %d crops (%d whole), %d steps, last loss %.3f",
             len(labels), int(labels.sum()), steps, loss.item())
    return model.eval()


@torch.inference_mode()
def score_boxes(model: BoxObjectness, image_rgb: np.ndarray, boxes: np.ndarray,
                chunk: int = 1024) -> np.ndarray:
    """The whole-object probability of each of ``boxes`` [n, 4] (0-based xyxy) in
    ``image_rgb`` (uint8 H × W × 3), float32 [n]."""
    if len(boxes) == 0:
        return np.zeros(0, np.float32)
    crops = crop_boxes(image_to_tensor(image_rgb), torch.from_numpy(
        np.asarray(boxes, np.float32)))
    # The crops are quantised as in training.
    crops = (crops * 255).round().clamp(0, 255) / 255
    return torch.cat([torch.sigmoid(model(crops[s:s + chunk]))
                      for s in range(0, len(crops), chunk)]).numpy().astype(np.float32)
