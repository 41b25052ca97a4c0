"""tools/demo_seeds.py: the demo's figures over seeds, checked against hand-computed means."""

from __future__ import annotations

import json
import statistics

import pytest

from tests.scripts import load_script


def load_tool():
    return load_script("tools/demo_seeds.py")


def figures(known, prev, recall, wi, aose):
    return {"known_mAP_both": known, "known_mAP_prev": prev, "unknown_recall": recall,
            "wilderness_impact": {"0.8": wi}, "a_ose": aose}


def demo_run(offset: float) -> dict:
    """A metrics.json whose reported ORE stage is ft (train at T1); EBUI figures differ."""
    run = {"ore": {}, "baseline": {}, "final_stage": {"ore": {}, "baseline": {}},
           "targets": {"t1": {"u_recall": {"pass": True}, "wi": {"pass": False}},
                       "t2": {"u_recall": {"pass": True}}, "all_pass": False}}
    for i, t in enumerate(("t1", "t2", "t3", "t4")):
        stage = "train" if i == 0 else "ft"
        ore = figures(60 - 5 * i + offset, None if i == 0 else 50 + offset, 40 + offset,
                      0.1, 100)
        run["ore"][t] = {stage: ore, "ebui": figures(1, 1, 99, 0.5, 7)}
        run["baseline"][t] = {stage: figures(50.0, None, 0.0, 0.2, 200)}
        run["final_stage"]["ore"][t] = run["final_stage"]["baseline"][t] = stage
    return run


def test_seed_table_means_spreads_and_prev_kept():
    tool = load_tool()
    runs = [demo_run(0.0), demo_run(4.0)]
    rows = tool.seed_table(runs).splitlines()
    t1 = [c.strip() for c in rows[2].strip("|").split("|")]
    assert t1[:4] == ["T1", f"62.0 ± {statistics.stdev([60, 64]):.1f}", "50.0 ± 0.0",
                      f"124 ± {statistics.stdev([120, 128]):.0f}%"]
    assert t1[5] == "–"
    t2 = [c.strip() for c in rows[3].strip("|").split("|")]
    # prev kept: T2's previously known mAP over T1's known mAP, per run: 50/60, 54/64.
    kept = [50 / 60 * 100, 54 / 64 * 100]
    assert t2[5] == f"{statistics.fmean(kept):.0f} ± {statistics.stdev(kept):.0f}%"
    assert t2[4] == "42.0 ± 2.8"  # U-Recall 40 and 44
    ebui = [c.strip() for c in tool.seed_table(runs, "ebui").splitlines()[2].strip("|").split("|")]
    assert ebui[4] == "99.0 ± 0.0"
    assert tool.targets_met(runs[0]) == (2, 3)


def test_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    tool = load_tool()
    good = tmp_path / "good"
    good.mkdir()
    (good / "metrics.json").write_text(json.dumps(demo_run(0.0)))
    assert tool.main([str(good)]) == 0
    assert "targets met per run (reported stage)" in capsys.readouterr().out
    assert tool.main([str(good), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("broken", [{"ore": {}}, {"ore": {"t1": []}}])
def test_a_malformed_metrics_file_is_a_one_line_error(tmp_path, capsys, broken):
    tool = load_tool()
    (tmp_path / "metrics.json").write_text(json.dumps(broken))
    assert tool.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unexpected metrics.json")
