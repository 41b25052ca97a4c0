"""The demo over several seeds: one table with the mean and spread of each figure.

    for s in 0 1 2; do ore demo --seed $s --output runs/demo-s$s; done
    python tools/demo_seeds.py runs/demo-s0 runs/demo-s1 runs/demo-s2

Reads each run's ``metrics.json`` (the reported stage of every task, and the report's
targets) and prints a Markdown table: known mAP of ORE and of the closed-set baseline,
their ratio, U-Recall, "prev kept" (previously known mAP at task t over the known mAP at
task t − 1), WI@0.8 and A-OSE of both, as mean ± standard deviation over the runs, then
the targets met per run. ``--stage ebui`` reads ORE's EBUI figures instead of its
reported stage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from ore.errors import OreError
from ore.fileio import read_json

TASKS = ("t1", "t2", "t3", "t4")


def _stage(run: dict, model: str, task: str, stage: str | None) -> dict:
    stages = run[model][task]
    name = stage or run["final_stage"][model][task]
    if stages.get(name) is None:
        raise OreError(f"{model} {task}: no {name!r} figures")
    return stages[name]


def _fmt(values: list[float], digits: int, percent: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    values = [v * scale for v in values]
    mean = statistics.fmean(values)
    unit = "%" if percent else ""
    if len(values) < 2:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}{unit}"


def seed_table(runs: list[dict], ore_stage: str | None = None) -> str:
    """The Markdown table of ``runs`` (each a demo's ``metrics.json``)."""
    head = ("| task | ORE known mAP | baseline known mAP | ratio | U-Recall | prev kept | "
            "WI ORE | WI base | A-OSE ORE | A-OSE base |")
    lines = [head, "|---|" + "---:|" * 9]
    for i, task in enumerate(TASKS):
        ore = [_stage(r, "ore", task, ore_stage) for r in runs]
        base = [_stage(r, "baseline", task, None) for r in runs]
        known = [m["known_mAP_both"] for m in ore]
        base_known = [m["known_mAP_both"] for m in base]
        ratio = [a / b for a, b in zip(known, base_known)]
        if i:
            before = [_stage(r, "ore", TASKS[i - 1], ore_stage)["known_mAP_both"] for r in runs]
            kept = _fmt([m["known_mAP_prev"] / b for m, b in zip(ore, before)], 0, True)
        else:
            kept = "–"
        lines.append("| " + " | ".join([
            task.upper(), _fmt(known, 1), _fmt(base_known, 1), _fmt(ratio, 0, True),
            _fmt([m["unknown_recall"] for m in ore], 1), kept,
            _fmt([m["wilderness_impact"]["0.8"] for m in ore], 3),
            _fmt([m["wilderness_impact"]["0.8"] for m in base], 3),
            _fmt([m["a_ose"] for m in ore], 0), _fmt([m["a_ose"] for m in base], 0),
        ]) + " |")
    return "\n".join(lines)


def targets_met(run: dict) -> tuple[int, int]:
    """(met, applicable) of the report's targets."""
    checks = [c for task in run["targets"].values() if isinstance(task, dict)
              for c in task.values()]
    return sum(bool(c["pass"]) for c in checks), len(checks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="demo output folders (ore demo --output)")
    p.add_argument("--stage", choices=("ebui",), default=None,
                   help="ORE's figures from this stage instead of each task's reported one")
    args = p.parse_args(argv)
    try:
        runs = []
        for folder in args.runs:
            path = folder / "metrics.json"
            if not path.is_file():
                raise OreError(f"{path}: missing (not a finished demo run)")
            runs.append(read_json(path))
        print(seed_table(runs, args.stage))
        met = [targets_met(r) for r in runs]
        print("targets met per run (reported stage): " + ", ".join(
            f"{folder}: {m} of {n}" for folder, (m, n) in zip(args.runs, met)))
    except (OreError, KeyError, TypeError, AttributeError) as e:
        print(f"error: {e if isinstance(e, OreError) else f'unexpected metrics.json: {e!r}'}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
