"""The switches that reproduce the reference as it ran (SPEC §9): clustering reduction,
zero-start prototypes and their update phase, a background store row, regressed
auto-labelled unknowns, EBUI's scoring temperature and drop rule, one iteration counter
across tasks."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from ore.cli import main
from ore.config import load_config
from ore.data.classes import load_task_split
from ore.engine.metrics_log import read_metrics
from ore.engine.runtime import lr_at
from ore.engine.trainer import Trainer
from ore.errors import OreError
from ore.modeling.clustering import PrototypeStore, clustering_loss
from ore.modeling.detector import build_detector
from ore.modeling.energy import EnergyRelabeller, energy
from tests.engine.test_trainer import quick_cfg
from tests.modeling.test_energy import SEEN_T1, logits_for, make_fit

TOY = load_task_split("toy")


def naive_mean_loss(features, labels, prototypes, valid, margin, p):
    """Mean of the N × C hinge terms, a row without a prototype counting 0."""
    terms = []
    for f, c in zip(features.tolist(), labels.tolist()):
        for i, proto in enumerate(prototypes.tolist()):
            d = sum(abs(a - b) ** p for a, b in zip(f, proto)) ** (1 / p)
            term = d if i == c else max(0.0, margin - d)
            terms.append(term if valid[i] else 0.0)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("p", [2.0, 10.0])
def test_mean_reduction_matches_the_naive_average_over_all_columns(p):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(7, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    prototypes = torch.randn(5, 4, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, True])
    got = clustering_loss(features, labels, prototypes, valid, margin=2.0, p=p,
                          reduction="mean")
    assert float(got) == pytest.approx(
        naive_mean_loss(features, labels, prototypes, valid.tolist(), 2.0, p), rel=1e-6)
    summed = clustering_loss(features, labels, prototypes, valid, margin=2.0, p=p)
    assert float(got) == pytest.approx(float(summed) / 5, rel=1e-6)  # 1/C of the sum
    with pytest.raises(ValueError, match="reduction"):
        clustering_loss(features, labels, prototypes, valid, margin=2.0, reduction="max")


def test_zero_start_prototypes_and_updates_at_multiples():
    store = PrototypeStore(3, 2, items_per_class=4, momentum=0.99, start_iter=4,
                           update_every=3, init="zero", phase="multiples")
    assert store.takes_batch_first
    store.prototypes.fill_(7.0)  # a previous task's prototypes: reset at start_iter
    store.valid[0] = True
    store.enqueue(torch.tensor([[2.0, 0.0], [4.0, 2.0]]), torch.tensor([0, 0]))
    assert [store.is_update(i) for i in range(3, 10)] == [
        False, True, False, True, False, False, True]  # 4 = start, then 6, 9
    store.step(4)
    torch.testing.assert_close(store.prototypes, torch.tensor([[3.0, 1.0], [0, 0], [0, 0]]))
    assert store.valid.tolist() == [True, True, True]  # every row, zero or not
    store.enqueue(torch.tensor([[10.0, 10.0]]), torch.tensor([2]))
    store.step(5)  # not an update
    assert float(store.prototypes[2].abs().sum()) == 0.0
    store.step(6)  # a zero prototype moves 1% of the way to its queue mean
    torch.testing.assert_close(store.prototypes[2], torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(store.prototypes[1], torch.zeros(2))  # empty queue: stays
    torch.testing.assert_close(store.prototypes[0], torch.tensor([3.0, 1.0]))
    # The default phase counts from start_iter instead.
    after = PrototypeStore(3, 2, start_iter=4, update_every=3)
    assert [after.is_update(i) for i in range(3, 11)] == [
        False, True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="init"):
        PrototypeStore(3, 2, init="ones")
    with pytest.raises(ValueError, match="phase"):
        PrototypeStore(3, 2, phase="daily")


def ore_model(*extra):
    cfg = load_config("toy/t1_train.yaml", ["MODEL.ROI_HEADS.NAME=ore", *extra])
    torch.manual_seed(0)
    return build_detector(cfg, TOY)


def test_background_row_fills_from_background_rois_and_enters_the_loss():
    model = ore_model("CLUSTERING.BACKGROUND_ROW=true", "CLUSTERING.START_ITER=0",
                      "CLUSTERING.PROTOTYPE_INIT=zero", "CLUSTERING.LOSS_REDUCTION=mean")
    store = model.roi_heads.store
    assert store.valid.shape == (TOY.num_classes + 2,)  # classes, unknown, background
    model.train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand((3, 128, 160), generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]),
                "labels": torch.tensor([1])} for _ in range(2)]
    losses = model(images, targets)
    assert int(store.queue_len[-1]) == store.items_per_class  # background features queued
    assert int(store.queue_len[0]) > 0 and int(store.queue_len[1]) == 0
    # Batch first, at start_iter: the prototypes already hold this batch's means.
    assert store.valid.all() and float(store.prototypes[-1].abs().sum()) > 0
    assert float(losses["loss_clustering"].detach()) > 0


def test_sampled_unknowns_regress_toward_the_gt_box_they_overlap_most():
    model = ore_model("OWOD.UNK_SOURCE=sampled", "OWOD.REGRESS_UNKNOWNS=true")
    heads = model.roi_heads
    proposals = [torch.tensor([[0.0, 0, 10, 10], [40, 40, 60, 60], [100, 100, 120, 130]])]
    gt = torch.tensor([[0.0, 0, 12, 12], [45, 30, 70, 70]])
    regs = [torch.zeros(3, 4)]
    heads.regress_sampled_unknowns(proposals, [torch.tensor([1, 2])], [{"boxes": gt}], regs)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    # RoI 1 overlaps GT 1 most; RoI 2 overlaps none, and argmax picks GT 0 (all zero).
    want = coder.encode_single(gt[[1, 0]], proposals[0][[1, 2]])
    torch.testing.assert_close(regs[0][1:], want)
    assert float(regs[0][0].abs().sum()) == 0.0  # not picked: untouched
    # In the loss the unknowns' deltas now count: the box loss grows with them.
    labels = [torch.tensor([1, TOY.unknown_label, 0])]
    logits = torch.zeros(3, TOY.num_classes + 2)
    deltas = torch.ones(3, 4 * (TOY.num_classes + 2))
    feats = torch.zeros(3, model.roi_heads.store.queue.shape[-1])
    on = heads.losses(logits, deltas, feats, labels, [regs[0].clone()])["loss_box_reg"]
    heads.regress_unknowns = False
    off = heads.losses(logits, deltas, feats, labels, [regs[0].clone()])["loss_box_reg"]
    assert float(on) > float(off) > 0


def test_reference_ebui_scores_at_its_own_t_drops_unknowns_and_skips_second_nms():
    fit = make_fit(known=(3.0, 2.0, 2.0), unknown=(2.0, -1.0, 2.0), T=1.5)
    U = TOY.unknown_label
    s = [0.0, 5.0, 4.5, 0.5]
    det = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [50, 50, 60, 60],
                                  [70, 70, 80, 80]]),
           "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
           "labels": torch.tensor([1, U, U, 2]),
           "logits": logits_for(s, T=1.5)}
    ref = EnergyRelabeller(fit, SEEN_T1, U, drop_unknowns=True, second_nms=False)
    out = ref(det, nms_thresh=0.5)
    # Box 0 (s = 0) becomes unknown and, with no second NMS, stays beside box 1, which is
    # dropped: an `unknown` whose densities say known (s = 5), as is box 2 (s = 4.5).
    assert out["labels"].tolist() == [U, U]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6])
    ours = EnergyRelabeller(fit, SEEN_T1, U)(det, nms_thresh=0.5)
    assert ours["labels"].tolist() == [U, U, U]  # box 1 removed by NMS against box 0
    # Scoring T: the rule reads energies at T = 1, not the fit's 1.5. With five equal seen
    # logits s(T) = g + T·log 5, so s = 3.0 at T = 1.5 (known side of the crossing near
    # 2.45) is 3.0 − 0.5·log 5 ≈ 2.2 at T = 1 (unknown side).
    at_one = EnergyRelabeller(fit, SEEN_T1, U, temperature=1.0)
    logits = logits_for([3.0], T=1.5)
    s_one = -energy(logits, SEEN_T1, 1.0)
    assert float(s_one) == pytest.approx(3.0 - 0.5 * math.log(5))
    assert ref.is_unknown(logits).tolist() == [False]
    assert at_one.is_unknown(logits).tolist() == [True]


def test_one_counter_across_tasks_starts_schedule_and_head_at_start_iter(toy_root, tmp_path):
    cfg = quick_cfg(toy_root, "SOLVER.START_ITER=3", "MODEL.ROI_HEADS.NAME=ore",
                    "SOLVER.WARMUP_ITERS=0", "SOLVER.STEPS=[2]", "SOLVER.CHECKPOINT_PERIOD=100")
    out = tmp_path / "run"
    final = Trainer(cfg, out).run()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [4, 6]  # iterations 4..6 of the one counter
    assert rows[0]["lr"] == pytest.approx(lr_at(cfg, 3)) == pytest.approx(0.1 * 2e-3)
    state = torch.load(final, weights_only=True)["model"]
    assert int(state["roi_heads.iteration"]) == 6  # the head counted from 3 as well


def test_bad_reference_keys_are_named(tmp_path, capsys):
    with pytest.raises(OreError, match="CLUSTERING.LOSS_REDUCTION"):
        ore_model("CLUSTERING.LOSS_REDUCTION=median")
    with pytest.raises(OreError, match="CLUSTERING.UPDATE_PHASE"):
        ore_model("CLUSTERING.UPDATE_PHASE=weekly")
    rc = main(["train", "--config", "toy/t1_train.yaml", "--output", str(tmp_path / "x"),
               "SOLVER.START_ITER=500", "SOLVER.MAX_ITER=400"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "SOLVER.START_ITER" in err and len(err.strip().splitlines()) == 1


def test_reference_preset_runs_two_tasks_on_the_toy_world(toy_root, tmp_path):
    """The preset's task files and method settings on the toy detector: one counter across
    tasks, finetune at lr 1e-4, the store's zero-start rows, EBUI reported."""
    import json

    import yaml

    from ore.config import CONFIG_ROOT

    ref = CONFIG_ROOT / "owod_reference"
    method = yaml.safe_load((ref / "base.yaml").read_text())
    method.pop("_BASE_")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "base.yaml").write_text(yaml.safe_dump(
        {"_BASE_": str(CONFIG_ROOT / "toy" / "base.yaml"), **method}))
    for name in ("t1_train.yaml", "t2_train.yaml", "t2_ft.yaml"):
        (configs / name).write_text((ref / name).read_text())
    out = tmp_path / "run"
    # Scale 1/4500: T1 0 -> 4, T2 4 -> 16, its finetune 16 -> 16.4 (17).
    args = ["run-tasks", "--configs", str(configs), "--output", str(out),
            "--schedule-scale", str(1 / 4500), f"DATASETS.ROOT={toy_root}",
            "SOLVER.IMS_PER_BATCH=2", "DATALOADER.NUM_WORKERS=0", "SOLVER.LOG_PERIOD=1",
            "EXEMPLARS.BUILD=true", "EXEMPLARS.PER_CLASS=2", "INPUT.MIN_SIZE_TRAIN=[96,112]"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"t1", "t2"} and summary["t2"]["reported"] == "ebui"
    t2 = load_config(out / "t2_train" / "config.yaml")
    assert (t2.SOLVER.START_ITER, t2.SOLVER.MAX_ITER, t2.CLUSTERING.START_ITER) == (4, 16, 4)
    assert t2.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE == 50
    assert t2.MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.5
    assert [r["iter"] for r in read_metrics(out / "t2_train" / "metrics.jsonl")][0] == 5
    ft_rows = read_metrics(out / "t2_ft" / "metrics.jsonl")
    assert ft_rows[0]["iter"] == 17 and ft_rows[0]["lr"] == pytest.approx(1e-4)
    state = torch.load(out / "t2_train" / "model_final.pth", weights_only=True)["model"]
    assert int(state["roi_heads.iteration"]) == 16
    assert state["roi_heads.store.valid"].all()  # zero-start: every row, background too
    assert len(state["roi_heads.store.valid"]) == TOY.num_classes + 2


def test_zero_start_rows_added_after_the_reset_join_the_loss_at_the_next_update():
    # A task whose counter starts past start_iter (no reset): a fresh row is not valid yet.
    store = PrototypeStore(3, 2, start_iter=4, update_every=3, init="zero", phase="multiples")
    store.valid[:2] = True
    store.enqueue(torch.tensor([[5.0, 5.0]]), torch.tensor([2]))
    store.step(9)
    assert store.valid.tolist() == [True, True, True]
    torch.testing.assert_close(store.prototypes[2], torch.tensor([0.05, 0.05]))


def test_planned_iterations_follow_the_one_counter():
    from ore.config import CONFIG_ROOT
    from ore.engine.tasks import planned_iterations

    ref = CONFIG_ROOT / "owod_reference"
    assert planned_iterations(ref) == 160500  # 0 -> 160.5k, counted once
    # Scaled by 1/4500: T1 0->4, T2 4->16, ft ->17, T3 16->25, ft ->26, T4 26->35, ft ->36.
    assert planned_iterations(ref, scale=1 / 4500) == 4 + 12 + 1 + 9 + 1 + 9 + 1
