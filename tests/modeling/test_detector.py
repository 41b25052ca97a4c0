from __future__ import annotations

import pytest
import torch

from ore.config import load_config
from ore.data.classes import load_task_split
from ore.engine.checkpoint import load_detector_weights, read_trunk_weights
from ore.errors import OreError
from ore.modeling.backbone import build_fpn_backbone, build_trunk
from ore.modeling.detector import build_detector, checkpoint_meta

TOY = load_task_split("toy")


def toy_model(task=1, head="standard"):
    cfg = load_config("toy/t1_train.yaml", [f"OWOD.TASK={task}", f"MODEL.ROI_HEADS.NAME={head}"])
    torch.manual_seed(0)
    return cfg, build_detector(cfg, TOY)


def fake_batch(n=2, size=(3, 128, 160)):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(size, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [80.0, 20.0, 120.0, 50.0]]),
                "labels": torch.tensor([1, 3])} for _ in range(n)]
    return images, targets


def test_masked_classes_get_no_gradient_and_never_win():
    cfg, model = toy_model(task=2)
    pred = model.roi_heads.box_predictor
    active = pred.active.clone()
    seen = [TOY.label(c) for c in TOY.seen(2)]
    assert active.nonzero().flatten().tolist() == [0, *seen]  # background + seen; no unknown
    model.train()
    images, targets = fake_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    grad = pred.cls_score.weight.grad
    assert grad[~active].abs().sum() == 0  # future classes and unknown: untouched
    assert grad[active].abs().sum() > 0
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = model(images)
    labels = torch.cat([o["labels"] for o in out])
    assert len(labels) > 0 and bool(active[labels].all())


def test_ore_head_activates_unknown():
    _, model = toy_model(task=1, head="ore")
    assert bool(model.roi_heads.box_predictor.active[TOY.unknown_label])


def test_backbone_weights_load_from_trunk_state_dict(tmp_path):
    trunk = build_trunk("tiny")
    with torch.no_grad():
        for p in trunk.parameters():
            p.normal_()
    state = {**trunk.state_dict(), "fc.weight": torch.zeros(3, 96), "head.0.bias": torch.zeros(4)}
    path = tmp_path / "trunk.pth"
    torch.save(state, path)
    backbone = _fpn_from_file(path, returned_stages=(2, 3, 4))
    got = backbone.body.state_dict()
    for k, v in trunk.state_dict().items():
        torch.testing.assert_close(got[k], v)
    torch.save({"conv9.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(OreError, match="does not match the trunk"):
        _fpn_from_file(tmp_path / "wrong.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(OreError, match="not a readable state dict"):
        _fpn_from_file(tmp_path / "text.pth")
    with pytest.raises(OreError, match="file not found"):
        _fpn_from_file(tmp_path / "none.pth")


def _fpn_from_file(path, **kwargs):
    return build_fpn_backbone(arch="tiny", weights=read_trunk_weights(path),
                              weights_source=str(path), **kwargs)


def test_resnet_trunk_uses_torchvision_key_names():
    keys = set(build_trunk("resnet18").state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer4.1.conv2.weight"} <= keys
    assert not any(k.startswith("fc.") for k in keys)


def test_checkpoint_for_another_class_layout_is_refused(tmp_path):
    cfg, model = toy_model()
    path = tmp_path / "m.pth"
    torch.save({"model": model.state_dict(), "meta": checkpoint_meta(cfg, TOY)}, path)
    _, fresh = toy_model()
    load_detector_weights(fresh, str(path), TOY)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    other = tmp_path / "other.yaml"
    other.write_text("tasks:\n  - [a, b]\n  - [c]\n")
    with pytest.raises(OreError, match="different class layout"):
        load_detector_weights(fresh, str(path), load_task_split(other))
    torch.save({"weights": 1}, tmp_path / "bad.pth")
    with pytest.raises(OreError, match="not an ORE detector checkpoint"):
        load_detector_weights(fresh, str(tmp_path / "bad.pth"), TOY)


def test_anchor_levels_must_match_backbone():
    cfg = load_config("toy/t1_train.yaml", ["MODEL.ANCHOR.SIZES=[[16],[32]]"])
    with pytest.raises(OreError, match="MODEL.ANCHOR.SIZES has 2 levels"):
        build_detector(cfg, TOY)
