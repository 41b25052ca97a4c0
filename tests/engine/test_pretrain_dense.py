"""``ore pretrain --method dense`` on a detection dataset's list: the written trunk (and
pyramid) loads into the toy detector tensor for tensor; user mistakes are one-line errors."""

from __future__ import annotations

import pytest
import torch

from ore.cli import main as cli_main
from ore.config import load_config
from ore.data.classes import load_task_split
from ore.engine.checkpoint import build_model, read_trunk_weights
from ore.engine.pretrain import PretrainOptions, load_image_list, pretrain
from ore.errors import OreError
from ore.modeling.backbone import build_trunk, load_trunk_state
from ore.modeling.backbone_weights import (
    BODY_PREFIX,
    FPN_PREFIX,
    load_fpn_state,
    split_backbone_state,
)

TOY_PYRAMID = ["--arch", "tiny_fpn", "--returned-stages", "2,3,4", "--fpn-channels", "48"]


def _pretrain(world, out, *extra):
    # 24 listed images at batch 12: two steps.
    rc = cli_main(["pretrain", "--method", "dense", "--list", f"{world}:t1_train", *TOY_PYRAMID,
                   "--epochs", "1", "--batch-size", "12", "--image-size", "64",
                   "--hidden-dim", "32", "--out-dim", "16", "--output", str(out),
                   "--no-progress", *extra])
    assert rc == 0 and out.is_file()
    return torch.load(out, weights_only=True)


def _toy_detector(world, weights=""):
    overrides = [f"DATASETS.ROOT={world}", "MODEL.ROI_HEADS.NAME=ore"]
    if weights:
        overrides.append(f"MODEL.BACKBONE.WEIGHTS={weights}")
    cfg = load_config("toy/t1_train.yaml", overrides)
    return build_model(cfg, load_task_split(cfg.DATASETS.CLASSES))


def test_list_reads_the_listed_images_once_each(toy_root):
    ids = (toy_root / "ImageSets/Main/t1_train.txt").read_text().split()
    images = load_image_list(f"{toy_root}:t1_train", 32)
    assert images.images.shape == (len(set(ids)), 3, 32, 32)
    assert images.images.dtype == torch.uint8 and images.labels is None


def test_dense_trunk_loads_into_the_toy_detector(toy_root, tmp_path):
    out = tmp_path / "dense" / "trunk.pth"
    state = _pretrain(toy_root, out)
    assert set(state) == set(build_trunk("tiny").state_dict())  # the trunk alone
    fresh = build_trunk("tiny").state_dict()
    assert not torch.equal(fresh["layer4.0.0.weight"], state["layer4.0.0.weight"])  # trained
    model = _toy_detector(toy_root, out)  # MODEL.BACKBONE.WEIGHTS, strict
    body = model.backbone.body.state_dict()
    assert set(body) == set(state)
    for k, v in state.items():
        assert torch.equal(body[k], v), k


def test_dense_backbone_export_holds_trunk_and_pyramid_of_the_detector(toy_root, tmp_path):
    out = tmp_path / "dense" / "backbone.pth"
    state = _pretrain(toy_root, out, "--export", "backbone", "--dense-weight", "1")
    model = _toy_detector(toy_root)
    own = model.state_dict()
    # Exactly the detector's backbone keys, trunk and pyramid.
    assert set(state) == {k for k in own if k.startswith((BODY_PREFIX, FPN_PREFIX))}
    trunk, fpn = split_backbone_state(read_trunk_weights(out), str(out))
    load_trunk_state(model.backbone.body, trunk, str(out))
    load_fpn_state(model.backbone.fpn, fpn, str(out))
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # Through MODEL.BACKBONE.WEIGHTS the detector gets both parts as well.
    built = _toy_detector(toy_root, out).state_dict()
    for k, v in state.items():
        assert torch.equal(built[k], v), k
    # A pyramid of another width is refused, naming the tensor.
    cfg = load_config("toy/t1_train.yaml", [f"DATASETS.ROOT={toy_root}",
                                            "MODEL.BACKBONE.FPN_CHANNELS=32"])
    narrow = build_model(cfg, load_task_split(cfg.DATASETS.CLASSES))
    with pytest.raises(OreError, match=r"backbone\.fpn\.inner_blocks\.0\.0\.weight has"):
        load_fpn_state(narrow.backbone.fpn, fpn, str(out))
    with pytest.raises(OreError, match="every key must start"):
        split_backbone_state({**state, "head.weight": torch.zeros(1)}, "x.pth")
    # A trunk file passes through whole.
    plain = build_trunk("tiny").state_dict()
    assert split_backbone_state(plain, "t.pth") == (plain, None)


def test_dense_trunk_features_train_without_a_pyramid(toy_root, tmp_path):
    out = tmp_path / "t" / "trunk.pth"
    state = _pretrain(toy_root, out, "--dense-features", "trunk", "--dense-grid", "2")
    assert set(state) == set(build_trunk("tiny").state_dict())


@pytest.mark.parametrize("argv,message", [
    (["--list", "nocolon"], "expected ROOT:LIST"),
    (["--list", "{world}:no_such_list"], "image list not found"),
    (["--export", "backbone", "--dense-features", "trunk"], "needs --method dense"),
    (["--returned-stages", "1,2,3"], "must end with stage 4"),
    (["--returned-stages", "3,2,4"], "increasing"),
    (["--dense-weight", "0"], "--dense-weight"),
    (["--small-crops", "2"], "no multi-crop"),
])
def test_dense_user_mistakes_are_one_line_errors(toy_root, tmp_path, capsys, argv, message):
    argv = [a.replace("{world}", str(toy_root)) for a in argv]
    if "--list" not in argv:
        argv = ["--list", f"{toy_root}:t1_train", *argv]
    rc = cli_main(["pretrain", "--method", "dense", *argv, "--arch", "tiny", "--epochs", "1",
                   "--batch-size", "12", "--image-size", "32", "--output",
                   str(tmp_path / "o.pth"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o.pth").exists()


def test_backbone_export_needs_the_dense_method(toy_root, tmp_path):
    args = PretrainOptions(method="simclr", list=f"{toy_root}:t1_train", arch="tiny",
                           export="backbone", output=str(tmp_path / "o.pth"))
    with pytest.raises(OreError, match="needs --method dense"):
        pretrain(args)
