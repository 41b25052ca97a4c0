from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork

from ore.cli import main
from ore.config import load_config
from ore.data.classes import load_task_split
from ore.data.exemplars import select_exemplars
from ore.data.records import ImageRecord
from ore.engine.checkpoint import load_detector_weights
from ore.modeling.clustering import PrototypeStore, clustering_loss
from ore.modeling.detector import build_detector, checkpoint_meta
from ore.modeling.roi_heads import pick_unknowns

TOY = load_task_split("toy")


def ore_model(*extra):
    cfg = load_config("toy/t1_train.yaml", ["MODEL.ROI_HEADS.NAME=ore", *extra])
    torch.manual_seed(0)
    return cfg, build_detector(cfg, TOY)


def batch(n=2):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand((3, 128, 160), generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [80.0, 20.0, 120.0, 50.0]]),
                "labels": torch.tensor([1, 3])} for _ in range(n)]
    return images, targets


# --- unknown auto-labelling ---------------------------------------------------------------

def test_pick_unknowns_takes_top_objectness_among_non_overlapping():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1 with GT: never
        [0.0, 0.0, 10.0, 12.0],    # IoU 0.83: never, though its score is the highest
        [5.0, 0.0, 15.0, 10.0],    # IoU 1/3: allowed
        [50.0, 50.0, 60.0, 60.0],  # IoU 0: allowed
        [30.0, 30.0, 40.0, 40.0],  # IoU 0: allowed, low score
    ])
    scores = torch.tensor([0.99, 0.98, 0.5, 0.7, 0.1])
    assert pick_unknowns(proposals, scores, gt, 1).tolist() == [3]
    assert pick_unknowns(proposals, scores, gt, 2).tolist() == [3, 2]
    assert pick_unknowns(proposals, scores, gt, 10).tolist() == [3, 2, 4]  # only 3 qualify
    assert pick_unknowns(proposals, scores, gt, 0).tolist() == []
    # Exactly at the threshold is an overlap: IoU 0.5 is not "< 0.5".
    half = torch.tensor([[0.0, 0.0, 10.0, 10.0 / 0.5]])  # IoU = 0.5
    assert pick_unknowns(half, torch.tensor([0.9]), gt, 1).tolist() == []
    assert pick_unknowns(proposals, scores, torch.zeros((0, 4)), 1).tolist() == [0]


def test_unknowns_join_targets_unregressed():
    _, model = ore_model("OWOD.NUM_UNK_PER_IMAGE=2")
    heads = model.roi_heads
    proposals = [torch.tensor([[10.0, 12.0, 60.0, 70.0], [100.0, 80.0, 140.0, 120.0],
                               [0.0, 0.0, 30.0, 30.0], [101.0, 81.0, 141.0, 121.0]])]
    scores = [torch.tensor([0.9, 0.8, 0.3, 0.7])]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([2])}]
    out = heads.add_unknown_targets(proposals, scores, targets)
    assert out[0]["labels"].tolist() == [2, TOY.unknown_label, TOY.unknown_label]
    torch.testing.assert_close(out[0]["boxes"][1:], proposals[0][[1, 3]])
    # Box regression: an unknown-labelled RoI contributes no box loss, a known one does.
    labels = [torch.tensor([TOY.unknown_label, 0])]
    reg = [torch.ones(2, 4)]
    feats = torch.zeros(2, heads.box_head.fc7.out_features)
    logits = torch.zeros(2, TOY.num_classes + 2)
    box = torch.zeros(2, 4 * (TOY.num_classes + 2), requires_grad=True)
    heads.clustering_enabled = False
    losses = heads.losses(logits, box, feats, labels, reg)
    assert float(losses["loss_box_reg"].detach()) == 0.0
    losses = heads.losses(logits, box, feats, [torch.tensor([2, 0])], reg)
    assert float(losses["loss_box_reg"].detach()) > 0


def test_sampled_mode_relabels_top_background():
    _, model = ore_model("OWOD.UNK_SOURCE=sampled", "OWOD.NUM_UNK_PER_IMAGE=1")
    labels = [torch.tensor([3, 0, 0, 0])]
    scores = [torch.tensor([2.0, 0.2, 0.9, 0.5])]
    model.roi_heads.relabel_sampled_unknowns(scores, labels)
    assert labels[0].tolist() == [3, 0, TOY.unknown_label, 0]


def test_scored_rpn_returns_torchvision_proposals_and_their_scores():
    _, model = ore_model()
    model.eval()
    images, _ = batch()
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    boxes, scores, _ = model.rpn(image_list, features)
    reference, _ = RegionProposalNetwork.forward(model.rpn, image_list, features)
    for b, s, r in zip(boxes, scores, reference):
        torch.testing.assert_close(b, r)
        assert s.shape == (len(b),) and bool(((s >= 0) & (s <= 1)).all())


# --- clustering ---------------------------------------------------------------------------

def naive_clustering_loss(features, labels, prototypes, valid, margin, p):
    total = 0.0
    for f, c in zip(features.tolist(), labels.tolist()):
        per_feature = 0.0
        for i, proto in enumerate(prototypes.tolist()):
            if not valid[i]:
                continue
            d = sum(abs(a - b) ** p for a, b in zip(f, proto)) ** (1 / p)
            per_feature += d if i == c else max(0.0, margin - d)
        total += per_feature
    return total / len(features)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_clustering_loss_matches_naive_loop(p):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(9, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1])
    prototypes = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    valid = torch.tensor([True, True, False, True])
    got = clustering_loss(features, labels, prototypes, valid, margin=6.0, p=p)
    want = naive_clustering_loss(features, labels, prototypes, valid.tolist(), 6.0, p)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_clustering_loss_analytic():
    # f sits on its own prototype; the other prototype is 3 away; margin 5 → 0 + (5 − 3).
    f = torch.tensor([[0.0, 0.0]])
    protos = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    valid = torch.tensor([True, True])
    assert float(clustering_loss(f, torch.tensor([0]), protos, valid, margin=5.0)) == 2.0
    assert float(clustering_loss(f, torch.tensor([1]), protos, valid, margin=5.0)) == 3.0 + 5.0
    assert float(clustering_loss(f, torch.tensor([0]), protos, torch.tensor([True, False]),
                                 margin=5.0)) == 0.0


def test_store_queue_wraps_and_prototypes_follow_momentum():
    store = PrototypeStore(3, 2, items_per_class=3, momentum=0.9, start_iter=5, update_every=2)
    store.enqueue(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]))
    store.step(4)  # before start_iter: nothing
    assert not store.valid.any()
    store.step(5)  # start: prototypes = queue means; class 1 and 2 have none
    torch.testing.assert_close(store.prototypes[0], torch.tensor([2.0, 0.0]))
    assert store.valid.tolist() == [True, False, False]
    # Queue of 3: pushing 4 more items keeps the 3 newest.
    store.enqueue(torch.tensor([[10.0, 0], [11.0, 0], [12.0, 0], [13.0, 0]]), torch.zeros(4).long())
    assert sorted(store.queue[0, :, 0].tolist()) == [11.0, 12.0, 13.0]
    store.enqueue(torch.tensor([[0.0, 4.0]]), torch.tensor([2]))
    store.step(6)  # not an update iteration (5 + 2k only)
    torch.testing.assert_close(store.prototypes[0], torch.tensor([2.0, 0.0]))
    store.step(7)
    torch.testing.assert_close(store.prototypes[0], torch.tensor([0.9 * 2.0 + 0.1 * 12.0, 0.0]))
    torch.testing.assert_close(store.prototypes[2], torch.tensor([0.0, 4.0]))  # first time: mean
    assert store.valid.tolist() == [True, False, True]


def test_clustering_loss_switches_on_at_start_iter_and_excludes_empty_classes():
    _, model = ore_model("CLUSTERING.START_ITER=2", "CLUSTERING.UPDATE_MU_ITER=1")
    model.train()
    images, targets = batch()
    values = []
    for _ in range(4):
        losses = model(images, targets)
        sum(losses.values()).backward()
        values.append(float(losses["loss_clustering"].detach()))
    assert values[:2] == [0.0, 0.0] and values[2] > 0
    store = model.roi_heads.store
    # Only classes with stored features have prototypes: labels 1 and 3, and unknown.
    assert store.valid.nonzero().flatten().tolist() == [0, 2, TOY.num_classes]
    assert int(model.roi_heads.iteration) == 4


def test_masked_classes_never_win_and_get_no_gradient_in_ore_head():
    cfg, model = ore_model("OWOD.TASK=2")
    pred = model.roi_heads.box_predictor
    active = pred.active.clone()
    assert bool(active[TOY.unknown_label]) and not bool(active[TOY.label(TOY.introduced(3)[0])])
    model.train()
    images, targets = batch()
    sum(model(images, targets).values()).backward()
    assert pred.cls_score.weight.grad[~active].abs().sum() == 0
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = model(images)
    for o in out:
        assert bool(active[o["labels"]].all())
        assert o["logits"].shape == (len(o["boxes"]), TOY.num_classes + 2)
        assert torch.isinf(o["logits"][:, ~active]).all()
        assert o["features"].shape == (len(o["boxes"]), cfg.MODEL.ROI_BOX_HEAD.FC_DIM)


def test_store_and_prototypes_round_trip_through_checkpoint(tmp_path):
    cfg, model = ore_model("CLUSTERING.START_ITER=1", "CLUSTERING.UPDATE_MU_ITER=1")
    model.train()
    images, targets = batch()
    for _ in range(3):
        sum(model(images, targets).values()).backward()
    path = tmp_path / "m.pth"
    torch.save({"model": model.state_dict(), "meta": checkpoint_meta(cfg, TOY)}, path)
    _, fresh = ore_model()
    load_detector_weights(fresh, str(path), TOY)
    a, b = model.roi_heads, fresh.roi_heads
    for name in ("queue", "queue_len", "queue_ptr", "prototypes", "valid"):
        torch.testing.assert_close(getattr(b.store, name), getattr(a.store, name))
    assert int(b.iteration) == 3 and bool(b.store.valid.any())


# --- exemplars and the task schedule ------------------------------------------------------

def test_exemplars_are_balanced_and_deterministic():
    recs = [ImageRecord(f"{i:03d}", "", 10, 10, names=names) for i, names in enumerate(
        [["circle"]] * 10 + [["square", "circle"]] * 3 + [["ring"]] * 5 + [["spiral"]] * 4)]
    ids = select_exemplars(recs, TOY, 1, per_class=2, seed=0)
    assert ids == select_exemplars(recs, TOY, 1, per_class=2, seed=0)
    chosen = [r for r in recs if r.image_id in ids]
    count = {c: sum(c in r.names for r in chosen) for c in ("circle", "square", "ring")}
    assert count["square"] == 2 and 2 <= count["circle"] <= 4 and count["ring"] == 0
    assert all(set(r.names) & {"circle", "square"} for r in chosen)  # no unseen-only images


def test_two_task_toy_run(toy_root, tmp_path, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    from ore.config import CONFIG_ROOT
    for name in ("base.yaml", "t1_train.yaml", "t2_train.yaml", "t2_ft.yaml"):
        (configs / name).write_text((CONFIG_ROOT / "toy" / name).read_text())
    out = tmp_path / "run"
    args = ["run-tasks", "--configs", str(configs), "--output", str(out),
            f"DATASETS.ROOT={toy_root}", "SOLVER.MAX_ITER=4", "SOLVER.IMS_PER_BATCH=2",
            "DATALOADER.NUM_WORKERS=0", "CLUSTERING.START_ITER=2",
            "CLUSTERING.UPDATE_MU_ITER=1", "EXEMPLARS.PER_CLASS=2",
            "INPUT.MIN_SIZE_TRAIN=[96,112]"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"t1", "t2"} and summary["t1"]["ft"] is None
    assert summary["t2"]["ft"]["known_mAP_prev"] is not None  # task 2 has previous classes
    exemplars = (out / "t2_ft" / "exemplars.txt").read_text().split()
    assert exemplars and (out / "t2_ft" / "model_final.pth").is_file()
    # Task 2 started from task 1's weights, prototypes included.
    t1 = torch.load(out / "t1_train" / "model_final.pth", weights_only=True)["model"]
    t2 = torch.load(out / "t2_train" / "model_final.pth", weights_only=True)["model"]
    assert int(t2["roi_heads.iteration"]) == int(t1["roi_heads.iteration"]) + 4
    # The finetune does not touch the store (clustering off there).
    ft = torch.load(out / "t2_ft" / "model_final.pth", weights_only=True)["model"]
    torch.testing.assert_close(ft["roi_heads.store.queue"], t2["roi_heads.store.queue"])
    # A second call finds everything done and changes nothing.
    before = (out / "t2_ft" / "model_final.pth").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "t2_ft" / "model_final.pth").stat().st_mtime_ns == before
    assert "t2 ft" in capsys.readouterr().out


def test_clustering_loss_stays_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(16, 64, generator=g) * 5
    labels = torch.randint(0, 4, (16,), generator=g)
    prototypes = torch.randn(4, 64, generator=g) * 5
    valid = torch.ones(4, dtype=torch.bool)
    want = clustering_loss(features, labels, prototypes, valid, margin=30.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = clustering_loss(features.bfloat16(), labels, prototypes, valid, margin=30.0)
    assert got.dtype == torch.float32
    # The only difference is the bf16 rounding of the inputs (8 bits of mantissa).
    assert float(got) == pytest.approx(float(want), rel=2e-2)
