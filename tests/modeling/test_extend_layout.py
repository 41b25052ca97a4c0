"""A checkpoint trained before a task was appended to its class split loads into the grown
detector: old labels keep their rows, ``unknown`` moves to the new last label, the added
classes start from the new model's initialisation — compared with a loop over labels by
name, and by the detector's own outputs."""

from __future__ import annotations

import pytest
import torch

from ore.config import load_config
from ore.data.classes import TaskSplit
from ore.errors import OreError
from ore.modeling.detector import build_detector, checkpoint_meta, load_detector_state

OLD = TaskSplit("old", (("circle", "square"), ("triangle",)))
NEW = TaskSplit("new", (("circle", "square"), ("triangle",), ("bolt", "spiral")))


def _model(split: TaskSplit, task: int, seed: int, *overrides: str):
    cfg = load_config("toy/t1_train.yaml", [f"OWOD.TASK={task}", *overrides])
    torch.manual_seed(seed)
    model = build_detector(cfg, split)
    with torch.no_grad():  # every entry distinct, so a misplaced row cannot go unseen
        for k, v in model.state_dict().items():
            if k.endswith(".active"):  # the active-class mask is the config's
                continue
            if v.is_floating_point():
                v.copy_(torch.randn_like(v))
            elif v.dtype == torch.bool:
                v.copy_(torch.rand(v.shape) > 0.5)
            elif v.dim() and v.dtype == torch.long:
                v.copy_(torch.randint(0, 5, v.shape))
    return cfg, model


def _naive_rows(old_names, new_names):
    """(old row, new row) for every label present in both layouts, found by name."""
    return [(i, new_names.index(n)) for i, n in enumerate(old_names)]


@pytest.mark.parametrize("background_row", [False, True])
def test_old_rows_move_by_name_and_added_rows_are_the_new_init(background_row):
    extra = [f"CLUSTERING.BACKGROUND_ROW={str(background_row).lower()}"]
    cfg_old, old = _model(OLD, 2, 0, *extra)
    _, new = _model(NEW, 3, 1, *extra)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    ckpt = {"model": old.state_dict(), "meta": checkpoint_meta(cfg_old, OLD)}
    load_detector_state(new, ckpt, NEW, "old.pth")
    got, was = new.state_dict(), old.state_dict()

    old_labels, new_labels = list(OLD.label_names), list(NEW.label_names)
    pairs = _naive_rows(old_labels, new_labels)
    added = [new_labels.index(n) for n in ("bolt", "spiral")]
    for suffix in ("weight", "bias"):
        key = f"roi_heads.box_predictor.cls_score.{suffix}"
        for i, j in pairs:
            assert torch.equal(got[key][j], was[key][i])
        for j in added:
            assert torch.equal(got[key][j], fresh[key][j])
        key = f"roi_heads.box_predictor.bbox_pred.{suffix}"
        for i, j in pairs:
            assert torch.equal(got[key][4 * j:4 * j + 4], was[key][4 * i:4 * i + 4])
        for j in added:
            assert torch.equal(got[key][4 * j:4 * j + 4], fresh[key][4 * j:4 * j + 4])
    # Store rows: the classes and unknown (label − 1), then the background row if kept.
    old_rows = [*OLD.classes, "unknown", *(["background"] * background_row)]
    new_rows = [*NEW.classes, "unknown", *(["background"] * background_row)]
    for key in ("queue", "queue_len", "queue_ptr", "prototypes", "valid"):
        key = f"roi_heads.store.{key}"
        assert got[key].shape[0] == len(new_rows)
        for i, j in _naive_rows(old_rows, new_rows):
            assert torch.equal(got[key][j], was[key][i]), key
        for name in ("bolt", "spiral"):
            j = new_rows.index(name)
            assert torch.equal(got[key][j], fresh[key][j]), key
    # Everything else is the old model's.
    for key, value in was.items():
        if not key.startswith(("roi_heads.box_predictor", "roi_heads.store")):
            assert torch.equal(got[key], value), key


def test_the_grown_detector_scores_old_classes_and_unknown_as_before():
    cfg_old, old = _model(OLD, 2, 0)
    _, new = _model(NEW, 2, 1)  # task 2 of the new split: the same classes active
    load_detector_state(new, {"model": old.state_dict(), "meta": checkpoint_meta(cfg_old, OLD)},
                        NEW, "old.pth")
    x = torch.randn(7, old.roi_heads.box_predictor.cls_score.in_features)
    old.eval(), new.eval()
    with torch.no_grad():
        (s_old, d_old), (s_new, d_new) = old.roi_heads.box_predictor(x), \
            new.roi_heads.box_predictor(x)
    keep = [NEW.label_names.index(n) for n in OLD.label_names]
    torch.testing.assert_close(s_new[:, keep], s_old)
    boxes = torch.tensor([4 * j + c for j in keep for c in range(4)])
    torch.testing.assert_close(d_new[:, boxes], d_old)


def test_another_layout_is_still_refused():
    cfg_old, old = _model(OLD, 2, 0)
    other = TaskSplit("other", (("square", "circle"), ("triangle",), ("bolt",)))
    _, new = _model(other, 2, 1)
    ckpt = {"model": old.state_dict(), "meta": checkpoint_meta(cfg_old, OLD)}
    with pytest.raises(OreError, match="different class layout"):
        load_detector_state(new, ckpt, other, "old.pth")
    # Fewer classes than the checkpoint: no prefix the other way round either.
    cfg_new, grown = _model(NEW, 2, 1)
    ckpt = {"model": grown.state_dict(), "meta": checkpoint_meta(cfg_new, NEW)}
    with pytest.raises(OreError, match="different class layout"):
        load_detector_state(old, ckpt, OLD, "new.pth")
