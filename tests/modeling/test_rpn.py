"""The RPN's objectness modes and what it learns of auto-labelled unknowns; the unknown
class's own test-time score threshold."""

from __future__ import annotations

import math

import pytest
import torch

from ore.config import load_config
from ore.data.classes import load_task_split
from ore.errors import OreError
from ore.modeling.detector import build_detector

TOY = load_task_split("toy")


def model_for(*extra):
    cfg = load_config("toy/t1_train.yaml", list(extra))
    torch.manual_seed(0)
    return build_detector(cfg, TOY)


def naive_iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_quality_loss_matches_the_formula_on_every_qualifying_anchor():
    rpn = model_for("MODEL.RPN.OBJECTNESS=quality", "MODEL.RPN.QUALITY_IOU=0.3").rpn
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0],
                             [5.0, 0.0, 15.0, 10.0], [40.0, 40.0, 50.0, 50.0]]),
               torch.tensor([[0.0, 0.0, 8.0, 8.0], [30.0, 30.0, 60.0, 60.0]])]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [38.0, 40.0, 50.0, 52.0]])},
               {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}]
    logits = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2, 1.5], requires_grad=True)
    loss = rpn.quality_loss(logits, anchors, targets)
    terms = []
    flat = [(a, t) for a, t in zip(anchors, targets) for _ in range(len(a))]
    flat_anchors = [x for a in anchors for x in a.tolist()]
    for i, (anchor, (_, t)) in enumerate(zip(flat_anchors, flat)):
        best = max(naive_iou(anchor, g) for g in t["boxes"].tolist())
        if best >= 0.3:
            terms.append(abs(1 / (1 + math.exp(-float(logits[i].detach()))) - best))
    # Anchors 1 (IoU 0.5), 0 (1.0), 2 (1/3), 3 (0.69) of image 0 and 0 (0.64) of image 1
    # qualify; image 1's far anchor (IoU 0) does not.
    assert len(terms) == 5
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    loss.backward()
    assert float(logits.grad[5]) == 0.0  # never a negative: no gradient at all
    assert all(float(g) != 0.0 for g in logits.grad[:5])


def test_quality_loss_samples_at_most_the_batch_size_per_image():
    rpn = model_for("MODEL.RPN.OBJECTNESS=quality", "MODEL.RPN.BATCH_SIZE_PER_IMAGE=3").rpn
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0 + d] for d in range(8)])]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}]
    logits = torch.zeros(8, requires_grad=True)
    rpn.quality_loss(logits, anchors, targets).backward()
    assert int((logits.grad != 0).sum()) == 3


def test_rpn_trains_in_quality_mode_and_scores_are_probabilities():
    model = model_for("MODEL.RPN.OBJECTNESS=quality")
    images = [torch.rand(3, 128, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    model.train()
    losses = model(images, targets)
    objectness = losses["loss_objectness"]
    assert torch.isfinite(objectness) and float(objectness.detach()) > 0
    losses["loss_objectness"].backward()
    assert model.rpn.head.cls_logits.weight.grad.abs().sum() > 0


def test_ignore_mode_leaves_only_negatives_near_an_unknown_out_of_the_loss():
    rpn = model_for("OWOD.RPN_UNKNOWNS=ignore").rpn
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0],      # positive on the GT: stays 1
                             [50.0, 50.0, 60.0, 60.0],    # on the unknown: 0 -> -1
                             [52.0, 50.0, 62.0, 60.0],    # IoU 0.67 with it: 0 -> -1
                             [58.0, 50.0, 68.0, 60.0],    # IoU 0.11 < 0.3: stays 0
                             [90.0, 90.0, 99.0, 99.0]])]  # between thresholds: stays -1
    labels = [torch.tensor([1.0, 0.0, 0.0, 0.0, -1.0])]
    unknown = [torch.tensor([[50.0, 50.0, 60.0, 60.0]])]
    assert rpn.ignore_near(labels, anchors, unknown)[0].tolist() == [1.0, -1.0, -1.0, 0.0, -1.0]
    assert rpn.ignore_near(labels, anchors, [torch.zeros((0, 4))])[0].tolist() == \
        labels[0].tolist()


@pytest.mark.parametrize("mode", ["negative", "ignore", "positive"])
def test_unknown_picks_reach_the_rpn_targets_only_in_positive_mode(mode, monkeypatch):
    model = model_for(f"OWOD.RPN_UNKNOWNS={mode}", "OWOD.NUM_UNK_PER_IMAGE=2")
    rpn = model.rpn
    seen = {}
    original = type(rpn).assign_targets_to_anchors

    def spy(self, anchors, targets):
        seen["boxes"] = [len(t["boxes"]) for t in targets]
        return original(self, anchors, targets)

    monkeypatch.setattr(type(rpn), "assign_targets_to_anchors", spy)
    picked = {}
    original_pick = type(rpn).unknown_boxes

    def spy_pick(self, boxes, scores, targets):
        out = original_pick(self, boxes, scores, targets)
        picked["n"] = [len(u) for u in out]
        return out

    monkeypatch.setattr(type(rpn), "unknown_boxes", spy_pick)
    model.train()
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
               for _ in images]
    model(images, targets)
    if mode == "negative":
        assert "n" not in picked and seen["boxes"] == [1, 1]
    else:
        assert picked["n"] == [2, 2]
        assert seen["boxes"] == ([3, 3] if mode == "positive" else [1, 1])


def test_bad_rpn_modes_are_one_line_errors():
    with pytest.raises(OreError, match=r"MODEL\.RPN\.OBJECTNESS: 'iou'.*classification"):
        model_for("MODEL.RPN.OBJECTNESS=iou")
    with pytest.raises(OreError, match=r"OWOD\.RPN_UNKNOWNS: 'maybe'.*ignore"):
        model_for("OWOD.RPN_UNKNOWNS=maybe")


def test_unknown_detections_have_their_own_score_threshold():
    def detections(*extra):
        heads = model_for(*extra).roi_heads
        c = TOY.num_classes + 2
        # Two RoIs: one sure of class 1, one mostly background with 2% unknown.
        probs = torch.full((2, c), 1e-6)
        probs[0, 1] = 0.9
        probs[1, 0], probs[1, -1] = 0.95, 0.02
        logits = probs.clamp_min(1e-12).log()
        proposals = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [80.0, 20.0, 120.0, 60.0]])]
        box_regression = torch.zeros(2, 4 * c)
        feats = torch.zeros(2, heads.box_head.fc7.out_features)
        (det,) = heads.postprocess_with_features(logits, box_regression, feats, proposals,
                                                 [(128, 160)])
        return det["labels"].tolist()

    shared = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.05"]
    assert TOY.unknown_label not in detections(*shared,
                                               "MODEL.ROI_HEADS.UNKNOWN_SCORE_THRESH_TEST=-1")
    kept = detections(*shared, "MODEL.ROI_HEADS.UNKNOWN_SCORE_THRESH_TEST=0.01")
    assert kept[0] == 1 and TOY.unknown_label in kept
    # Known classes keep the shared threshold: class 1 at 1e-6 on RoI 1 is not kept.
    assert kept.count(1) == 1


def test_an_explicit_predictor_threshold_holds_for_unknowns_too(monkeypatch):
    from ore.engine import inference

    cfg = load_config("toy/t1_train.yaml", ["MODEL.ROI_HEADS.UNKNOWN_SCORE_THRESH_TEST=0.001"])
    monkeypatch.setattr(inference, "build_model", lambda c, split, w: build_detector(c, split))
    heads = inference.Predictor(cfg, "unused.pth", score_thresh=0.4).model.roi_heads
    assert (heads.score_thresh, heads.unknown_score_thresh) == (0.4, 0.4)
    heads = inference.Predictor(cfg, "unused.pth").model.roi_heads
    assert (heads.score_thresh, heads.unknown_score_thresh) == (0.05, 0.001)
