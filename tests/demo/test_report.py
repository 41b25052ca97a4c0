"""The demo report: target arithmetic, self-contained HTML, atomic writes, the sample grid."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from ore.demo.figures import pick_samples
from ore.demo.report import write_report
from ore.demo.targets import evaluate_targets
from ore.engine.layout import final_stage

WI_KEYS = [f"0.{i}" for i in range(1, 10)]


def metrics(prev=None, cur=50.0, both=50.0, ur=None, wi=0.05, a_ose=10, udr=None, udp=None):
    return {
        "known_mAP_prev": prev, "known_mAP_current": cur, "known_mAP_both": both,
        "unknown_recall": ur, "unknown_ap": None, "unknown_precision": None,
        "wilderness_impact": {k: wi for k in WI_KEYS}, "a_ose": a_ose, "udr": udr, "udp": udp,
        "coco": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}, "per_class_ap": {},
        "protocol": "listed-lines", "listed_lines": 30, "unique_images": 28,
    }


def ore_summary():
    return {
        "t1": {"train": metrics(cur=71.4, both=71.4, ur=31.5, wi=0.0123, a_ose=12, udr=40.0,
                                udp=78.0), "ft": None},
        "t2": {"train": metrics(prev=40.0, cur=60.0, both=50.0, ur=25.0, wi=0.02, a_ose=30),
               "ft": metrics(prev=55.5, cur=58.0, both=56.7, ur=22.0, wi=0.021, a_ose=25)},
        "t3": {"train": metrics(prev=50.0, cur=60.0, both=53.0, ur=10.0, wi=0.03, a_ose=40),
               "ft": metrics(prev=48.0, cur=61.0, both=52.0, ur=15.0, wi=0.03, a_ose=40),
               "ebui": metrics(prev=48.0, cur=61.0, both=52.0, ur=18.5, wi=0.025, a_ose=35)},
    }


def baseline_summary():
    return {
        "t1": {"train": metrics(cur=74.0, both=74.0, ur=0.0, wi=0.0456, a_ose=99, udr=30.0,
                                udp=0.0), "ft": None},
        "t2": {"train": metrics(prev=41.0, cur=61.0, both=51.0, ur=0.0, wi=0.04, a_ose=80),
               "ft": metrics(prev=52.0, cur=59.0, both=60.0, ur=0.0, wi=0.04, a_ose=80)},
        "t3": {"train": metrics(prev=50.0, cur=60.0, both=53.0, ur=0.0, wi=0.01, a_ose=35),
               "ft": metrics(prev=49.0, cur=60.0, both=54.0, ur=0.0, wi=0.01, a_ose=35)},
    }


def make_run(root: Path, summary: dict, energy: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "summary.json").write_text(json.dumps(summary))
    for t in summary:
        for stage, start in (("train", 3.0), ("ft", 1.5)):
            d = root / f"{t}_{stage}"
            d.mkdir()
            rows = [{"iter": i, "lr": 0.02, "loss": start / (1 + i / 20), "loss_cls": 0.1}
                    for i in range(20, 201, 20)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                             + '{"iter": 22')  # a line cut by a crash
    if energy:  # where `ore run-tasks` puts it: <final stage>/energy/energy.png
        import cv2
        import numpy as np

        img = np.full((60, 90, 3), 200, np.uint8)
        (root / "t1_ft" / "energy").mkdir()
        png = cv2.imencode(".png", img)[1].tobytes()
        (root / "t1_ft" / "energy" / "energy.png").write_bytes(png)
    return root


def test_final_stage_order():
    assert final_stage({"train": {}, "ft": None}) == "train"
    assert final_stage({"train": {}, "ft": {}}) == "ft"
    assert final_stage({"ebui": {}, "train": {}, "ft": {}}) == "ebui"
    assert final_stage({"train": None, "other": {}}) is None
    assert final_stage(None) is None


def test_final_stage_follows_the_reported_stage_of_the_summary():
    stages = {"train": {}, "ft": {"x": 1}, "ebui": {"x": 2}, "reported": "ft"}
    assert final_stage(stages) == "ft"
    assert final_stage({**stages, "reported": "ebui"}) == "ebui"
    # A reported stage without figures, or an unknown name, falls back to the order.
    assert final_stage({**stages, "ft": None, "reported": "ft"}) == "ebui"
    assert final_stage({**stages, "reported": "nonsense"}) == "ebui"
    t = evaluate_targets({"t1": {"train": metrics(both=60.0, ur=55.0), "ft": None,
                                 "ebui": metrics(both=40.0, ur=70.0), "reported": "train"}},
                         {"t1": {"train": metrics(both=62.0)}})
    assert t["t1"]["known_map_ratio"]["value"] == pytest.approx(60 / 62)
    assert t["t1"]["u_recall"]["value"] == 55.0


def test_targets_on_hand_made_numbers():
    t = evaluate_targets(ore_summary(), baseline_summary())
    # T1: U-Recall 31.5 < 50; 71.4 / 74 = 0.965 ≥ 0.95; WI and A-OSE below the baseline's.
    assert t["t1"]["u_recall"] == {"value": 31.5, "pass": False, "threshold": 50.0}
    assert t["t1"]["known_map_ratio"]["value"] == pytest.approx(71.4 / 74)
    assert t["t1"]["known_map_ratio"]["pass"] is True
    assert "prev_known_kept" not in t["t1"]
    assert t["t1"]["wi"] == {"value": 0.0123, "pass": True, "baseline": 0.0456}
    assert t["t1"]["a_ose"] == {"value": 12, "pass": True, "baseline": 99}
    # T2 uses the finetuned figures: 56.7 / 60 = 0.945 < 0.95; T1's classes went from
    # 71.4 (T1's final figure) to 55.5 (previously known at T2): 0.777 < 0.85.
    assert t["t2"]["known_map_ratio"]["value"] == pytest.approx(56.7 / 60)
    assert t["t2"]["known_map_ratio"]["pass"] is False
    assert t["t2"]["u_recall"]["value"] == 22.0
    kept = t["t2"]["prev_known_kept"]
    assert kept["value"] == pytest.approx(55.5 / 71.4) and kept["pass"] is False
    assert (kept["before"], kept["after"]) == (71.4, 55.5)
    # T3 uses "ebui": U-Recall 18.5 fails; 52 / 54 = 0.963 passes; 48 / 56.7 = 0.847 just
    # misses 0.85; WI/A-OSE above the baseline's.
    assert t["t3"]["u_recall"]["pass"] is False and t["t3"]["u_recall"]["value"] == 18.5
    assert t["t3"]["known_map_ratio"]["value"] == pytest.approx(52 / 54)
    assert t["t3"]["known_map_ratio"]["pass"] is True
    assert t["t3"]["prev_known_kept"]["value"] == pytest.approx(48 / 56.7)
    assert t["t3"]["prev_known_kept"]["pass"] is False
    assert t["t3"]["wi"]["pass"] is False and t["t3"]["a_ose"]["pass"] is False
    assert t["all_pass"] is False


def test_targets_not_applicable_and_all_pass():
    ore = {"t1": {"train": metrics(both=50.0, ur=None, wi=0.01, a_ose=1)}}
    base = {"t1": {"train": metrics(both=0.0, wi=0.02, a_ose=2)}}
    t = evaluate_targets(ore, base)
    assert t["t1"]["u_recall"]["pass"] is None  # no unknown object: does not apply
    assert t["t1"]["known_map_ratio"]["pass"] is None  # baseline mAP 0: no ratio
    assert t["all_pass"] is True  # the two that apply pass


def test_pick_samples_prefers_unknowns_and_is_deterministic():
    from ore.data.records import ImageRecord

    recs = [ImageRecord(str(i), "", 1, 1, names=["unknown"] if i % 3 == 0 else ["circle"])
            for i in range(30)]
    a = pick_samples(recs, 4)
    assert [r.image_id for r in a] == [r.image_id for r in pick_samples(recs, 4)]
    assert all("unknown" in r.names for r in a) and len({r.image_id for r in a}) == 4
    assert len(pick_samples(recs, 50)) == 30


def test_report_is_self_contained_and_atomic(tmp_path, monkeypatch):
    ore = make_run(tmp_path / "ore", ore_summary(), energy=True)
    base = make_run(tmp_path / "base", baseline_summary())
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr("ore.fileio.os.replace",
                        lambda a, b: (replaced.append(Path(b).name), real_replace(a, b)))
    out = write_report(tmp_path / "report", ore_run=ore, baseline_run=base, ore_config=None)
    written = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert sorted(replaced) == written  # every file came in by an atomic rename
    assert {"report.html", "report.md", "metrics.json", "report_metrics.png",
            "report_losses.png", "report_energy_t1.png"} <= set(written)

    page = out["html"].read_text()
    assert "src=\"http" not in page and "<link" not in page and "<script" not in page
    assert "url(" not in page
    srcs = re.findall(r'<img src="([^"]{0,30})', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for number in ("71.4", "74.0", "0.0123", "0.0456", "31.5", "56.7", "18.5", "99"):
        assert number in page, number
    assert "no energy fit" in page  # t2 and t3 have none
    # T1 U-Recall; T2 U-Recall, mAP ratio, previously known; T3 U-Recall, previously
    # known, WI, A-OSE (the targets test above).
    assert page.count(">FAIL<") == 8 and ">pass<" in page
    assert '<td class="num group best">0.0123</td>' in page  # lower WI is better

    md = out["md"].read_text()
    assert "(protocol listed-lines: 30 listed lines, 28 unique images;" in md
    assert "(protocol listed-lines: 30 listed lines, 28 unique images;" in page
    assert "| Known mAP (both) ↑ | 71.4 | **74.0** | 56.7 | **60.0** | 52.0 | **54.0** |" in md
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / "report" / name).is_file()

    saved = json.loads(out["metrics"].read_text())
    assert saved["ore"] == ore_summary() and saved["baseline"] == baseline_summary()
    assert saved["targets"] == out["targets"] == evaluate_targets(ore_summary(),
                                                                  baseline_summary())
    assert saved["final_stage"]["ore"] == {"t1": "train", "t2": "ft", "t3": "ebui"}


def test_report_missing_summary_is_a_user_error(tmp_path):
    from ore.errors import OreError

    with pytest.raises(OreError, match="summary.json"):
        write_report(tmp_path / "r", ore_run=tmp_path / "nope", baseline_run=tmp_path / "nope")


def test_report_sample_grid_with_an_untrained_model(tmp_path, toy_root):
    import torch

    from ore.config import load_config
    from ore.data.classes import load_task_split
    from ore.modeling.detector import build_detector, checkpoint_meta

    split = load_task_split("toy")
    cfg = load_config("toy/t1_train.yaml", [f"DATASETS.ROOT={toy_root}"])
    torch.manual_seed(0)
    model = build_detector(cfg, split)
    summary = {"t1": {"train": metrics(ur=25.0), "ft": None}}
    ore = make_run(tmp_path / "ore", summary)
    torch.save({"model": model.state_dict(), "meta": checkpoint_meta(cfg, split)},
               ore / "t1_train" / "model_final.pth")
    base = make_run(tmp_path / "base", summary)
    out = write_report(tmp_path / "report", ore_run=ore, baseline_run=base, toy_root=toy_root,
                       ore_config="toy/t1_train.yaml", samples=3)
    samples = sorted((tmp_path / "report").glob("report_sample_*.png"))
    assert len(samples) == 3
    page = out["html"].read_text()
    assert "Detections on test images" in page and page.count("<img ") == 2 + 3
