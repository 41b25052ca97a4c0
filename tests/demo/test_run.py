"""End to end: `ore demo --quick` writes the toy world, runs ORE and the baseline on all
four tasks (train, finetune, energy fit, evaluation), closes the open-world loop (discover,
task 5 from ground-truth labels beside the discovered ones) and writes the report."""

from __future__ import annotations

import json

import yaml

from ore.cli import main


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--quick"]) == 0
    html = (out / "report.html").read_text()
    assert "<img" in html and 'src="http' not in html and "<link" not in html
    assert (out / "report.md").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    ore, baseline = metrics["ore"], metrics["baseline"]
    assert set(ore) == set(baseline) == {"t1", "t2", "t3", "t4"}
    for t in ("t2", "t3", "t4"):
        assert ore[t]["ft"] is not None and ore[t]["ebui"] is not None  # finetune + EBUI ran
        assert baseline[t]["ebui"] is None  # no energy fit for the closed-set head
        assert baseline[t]["ft"]["unknown_recall"] == 0.0  # it cannot say unknown
    for t in ("t1", "t2", "t3", "t4"):
        assert (out / "ore" / f"{t}_{'train' if t == 't1' else 'ft'}" / "energy" /
                "energy_fit.json").is_file()
    assert set(metrics["targets"]) >= {"t1", "t2", "t3", "t4"}
    assert "report.html" in capsys.readouterr().out

    # The loop: task 5 learnt on branches, the ORE run itself left at four tasks.
    loop = metrics["loop"]
    assert loop["task"] == 5 and loop["new_classes"] == ["spiral", "hourglass", "bolt"]
    assert not (out / "ore" / "t5_train").exists()
    assert json.loads((out / "ore" / "summary.json").read_text()).keys() == set(ore)
    gt = loop["tasks"]["ground_truth"]
    t5 = json.loads((out / "loop" / "t5-ground-truth" / "summary.json").read_text())["t5"]
    assert gt["old_mAP_after"] == t5[t5["reported"]]["known_mAP_prev"]
    assert set(gt["new_AP50"]) == {"spiral", "hourglass", "bolt"}
    assert (out / "loop" / "t5-ground-truth" / "t4_ft").is_symlink()
    disc = loop["tasks"]["discovered"]
    named = set(yaml.safe_load((out / "loop" / "discover" / "names.yaml").read_text())
                .values()) - {"ignore"} if (out / "loop" / "discover" / "names.yaml").is_file() \
        else set()
    if named:  # a cluster was named: task 5 learnt from it
        t5 = json.loads((out / "loop" / "t5-discovered" / "summary.json").read_text())["t5"]
        assert disc["old_mAP_after"] == t5[t5["reported"]]["known_mAP_prev"]
    else:
        assert disc["skipped"] and not (out / "loop" / "t5-discovered").exists()
    assert "From unknowns to new classes: task 5" in html
    assert set(loop["targets"]) == {"purity", "coverage", "new_ap50_ratio", "old_map_kept"}
