"""The energy fit: collect RoI energies on a held-out split and fit the EBUI Weibulls.

The model runs backbone + RPN in eval mode on each image of the split (test role:
objects of unseen classes are ``unknown``). Proposals, with the GT boxes appended as in
training, are matched to ground truth by IoU ≥ 0.5 (best match wins); a proposal matched
to nothing is not a sample.

- ``labelled``: proposals matched to a known-class object are known samples, those
  matched to an unknown-class object unknown samples (the reference; uses unknown labels).
- ``pseudo``: the unknown objects' labels are never read. The known objects stay as GT,
  and the ORE head's auto-labelling (top-k proposals by objectness overlapping no known
  object, ``OWOD.NUM_UNK_PER_IMAGE``) supplies the unknown boxes; proposals matched to
  those are unknown samples.

Each sample's logits come from the box head (RoIAlign → box head → classifier), and its
energy from the seen known classes' logits (``ore.modeling.energy``). Writes
``energy_fit.json`` and ``energy.png`` into the output folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torchvision.ops import box_iou
from tqdm import tqdm

from ore.data.dataset import (
    DetectionDataset,
    make_test_loader,
    note_size_mismatches,
    split_bad,
)
from ore.data.records import list_path, load_dataset_split
from ore.engine.inference import Predictor
from ore.engine.layout import ENERGY_FIT, ENERGY_PLOT
from ore.errors import OreError
from ore.fileio import check_output_dir
from ore.modeling.energy import energy
from ore.modeling.fit_file import MODES, EnergyFit, fit_energies
from ore.vis.plots import plot_energy

log = logging.getLogger(__name__)

MATCH_IOU = 0.5


@torch.no_grad()
def rois_energies(model, images: list[torch.Tensor], targets: list[dict], *, mode: str,
                  seen_labels: list[int], unknown_label: int, temperature: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Negated energies s = −E of the known and the unknown RoI samples of one batch.

    Args:
        model: an ``OpenWorldRCNN`` with the ORE head, in eval mode.
        images: [3, H, W] float images; targets: ``boxes`` [N, 4] (0-based), ``labels`` [N].
    Returns:
        (s_known [Nk], s_unknown [Nu]) on the CPU.
    """
    heads = model.roi_heads
    image_list, targets = model.transform(images, targets)  # boxes follow the resize
    features = model.backbone(image_list.tensors)
    proposals, scores, _ = model.rpn(image_list, features)
    if mode == "pseudo":
        known_only = [{"boxes": t["boxes"][t["labels"] != unknown_label],
                       "labels": t["labels"][t["labels"] != unknown_label]} for t in targets]
        targets = heads.add_unknown_targets(proposals, scores, known_only)
    rois, is_unknown = [], []
    for p, t in zip(proposals, targets):
        if len(t["boxes"]) == 0 or len(p) == 0:
            rois.append(p[:0])
            is_unknown.append(torch.zeros(0, dtype=torch.bool, device=p.device))
            continue
        # GT boxes join the proposals, as in training (and in the reference, which logged
        # the energies of sampled RoIs): every object gives at least one sample.
        p = torch.cat([p, t["boxes"].to(p.dtype)])
        best, idx = box_iou(p, t["boxes"].to(p.dtype)).max(dim=1)  # [P + G]
        keep = best >= MATCH_IOU
        rois.append(p[keep])
        is_unknown.append(t["labels"][idx[keep]] == unknown_label)
    is_unknown = torch.cat(is_unknown)
    if len(is_unknown) == 0:
        empty = torch.zeros(0)
        return empty, empty
    feats = heads.box_head(heads.box_roi_pool(features, rois, image_list.image_sizes))
    logits, _ = heads.box_predictor(feats)  # [R, C]
    s = -energy(logits, seen_labels, temperature).cpu()  # [R]
    is_unknown = is_unknown.cpu()
    return s[~is_unknown], s[is_unknown]


def collect_energies(predictor: Predictor, split_name: str, *, mode: str, batch_size: int = 4,
                     max_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Negated energies of the known and unknown RoI samples over ``split_name``."""
    cfg, split, model = predictor.cfg, predictor.split, predictor.model
    d = cfg.DATASETS
    task = split.check_task(cfg.OWOD.TASK)
    if d.FORMAT == "voc" and not list_path(Path(d.ROOT), split_name).is_file():
        where = list_path(Path(d.ROOT), split_name)
        raise OreError(f"energy fit split {split_name!r}: no list {where} "
                       "(set EBUI.FIT_SPLIT or --split)")
    records = load_dataset_split(d, split_name, split, task, "test")
    if max_images > 0:
        records = records[:max_images]
    if not records:
        raise OreError(f"split {split_name!r} under {d.ROOT} lists no image")
    seen_labels = [split.label(c) for c in split.seen(task)]
    dataset = DetectionDataset(records, split, max_pixels=cfg.INPUT.MAX_PIXELS)
    loader = make_test_loader(dataset, batch_size, cfg.DATALOADER.NUM_WORKERS)
    known, unknown = [], []
    counts: dict = {}
    mismatched: set[str] = set()
    for batch in tqdm(loader, desc=f"energies {split_name}", unit="batch"):
        batch = split_bad(batch, cfg.DATALOADER.SKIP_BAD_IMAGES)
        note_size_mismatches(batch, counts, mismatched)
        if not batch:
            continue
        images = [b[0].to(predictor.device) for b in batch]
        targets = [{k: v.to(predictor.device) for k, v in b[1].items()} for b in batch]
        k, u = rois_energies(model, images, targets, mode=mode, seen_labels=seen_labels,
                             unknown_label=split.unknown_label,
                             temperature=float(cfg.EBUI.TEMPERATURE))
        known.append(k.numpy())
        unknown.append(u.numpy())
    return np.concatenate(known), np.concatenate(unknown)


def fit_energy(cfg, weights: str, output: str | Path, *, split_name: str | None = None,
               mode: str | None = None, batch_size: int = 4, max_images: int = 0
               ) -> EnergyFit:
    """Collect, fit, write ``energy_fit.json`` + ``energy.png``; returns the EnergyFit."""
    check_output_dir(output)
    if max_images < 0:
        raise OreError(f"--max-images {max_images} must be ≥ 0 (0: every image)")
    mode = mode or cfg.EBUI.MODE
    if mode not in MODES:
        raise OreError(f"EBUI.MODE / --mode: {mode!r}; expected one of {MODES}")
    if cfg.MODEL.ROI_HEADS.NAME != "ore":
        raise OreError("fit-energy needs MODEL.ROI_HEADS.NAME=ore (the head with `unknown`)")
    split_name = split_name or cfg.EBUI.FIT_SPLIT or cfg.DATASETS.TEST
    # The fit runs the plain detector: an EBUI already switched on must not shape its input.
    cfg = OmegaConf.merge(cfg, {"EBUI": {"ENABLED": False}})
    predictor = Predictor(cfg, weights)
    t0 = time.perf_counter()
    known, unknown = collect_energies(predictor, split_name, mode=mode, batch_size=batch_size,
                                      max_images=max_images)
    t1 = time.perf_counter()
    task = predictor.split.check_task(cfg.OWOD.TASK)
    fit = fit_energies(known, unknown, temperature=float(cfg.EBUI.TEMPERATURE), mode=mode,
                       seen_classes=predictor.split.seen(task))
    t2 = time.perf_counter()
    fit.extra = {"split": split_name, "task": task, "weights": str(weights),
                 "collect_seconds": round(t1 - t0, 3), "fit_seconds": round(t2 - t1, 3)}
    out = Path(output)
    fit.save(out / ENERGY_FIT)
    plot_energy(known, unknown, fit, out / ENERGY_PLOT)
    return fit
