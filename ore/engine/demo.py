"""``ore demo``: the whole open-world story on the toy world, and a report.

1. writes the toy world;
2. runs every task with the ORE head (train, exemplar finetune, energy fit, evaluation);
3. runs the closed-set Faster R-CNN on the same schedule (the baseline);
4. writes ``report.html`` (self-contained), ``report.md`` and ``metrics.json``.

The two runs go side by side in two processes with one thread each, which on a 2-core
machine is faster than one after the other. Everything resumes: run the command again
after an interruption and finished stages are skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# --quick: a smaller world and a schedule scaled down, for a check in about 3 minutes.
QUICK_WORLD = dict(images_per_task=40, val_images=20, test_images=30, exemplars_per_class=3)
QUICK_SCALE = 0.06


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="runs/demo", help="folder for everything the demo writes")
    p.add_argument("--quick", action="store_true",
                   help="a small world and a short schedule (a smoke test, not a result)")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy world and the training")


def _planned_iterations(scale: float) -> int:
    """Training iterations of one run over every toy task config (as run-tasks scales)."""
    from ore.config import CONFIG_ROOT, load_config
    from ore.engine.tasks import discover_tasks, scaled_iterations

    total = 0
    for _, train, ft in discover_tasks(CONFIG_ROOT / "toy"):
        for f in (train, ft):
            if f is not None:
                total += scaled_iterations(load_config(f).SOLVER.MAX_ITER, scale)
    return total


def _done_iterations(run_dirs: list[Path]) -> int:
    """Iterations finished so far, from the runs' metrics.jsonl files."""
    import json

    done = 0
    for run_dir in run_dirs:
        for metrics in run_dir.glob("t*_*/metrics.jsonl"):
            lines = metrics.read_text().strip().splitlines()
            if lines:
                done += json.loads(lines[-1]).get("iter", 0)
    return done


def _run_children(jobs: dict[str, list[str]], logs: Path, progress=None) -> None:
    """Start one process per job, poll ``progress()`` into a bar, fail if any fails."""
    from ore.errors import OreError

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    procs = {}
    for name, argv in jobs.items():
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed below
        procs[name] = (subprocess.Popen([sys.executable, "-m", "ore", *argv], stdout=log,
                                        stderr=subprocess.STDOUT, env=env), log)
    try:
        while any(p.poll() is None for p, _ in procs.values()):
            time.sleep(2)
            if progress is not None:
                progress()
    except KeyboardInterrupt:
        for p, _ in procs.values():
            p.terminate()
        raise
    finally:
        for _, log in procs.values():
            log.close()
    failed = [n for n, (p, _) in procs.items() if p.returncode != 0]
    if failed:
        tail = (logs / f"{failed[0]}.log").read_text().strip().splitlines()[-1:]
        raise OreError(f"demo stage {failed[0]} failed ({' '.join(tail)}); "
                       f"see {logs / (failed[0] + '.log')}")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ore.data.toy import write_toy_world
    from ore.report import write_report

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = out / "toy-data"
    if not (world / "ImageSets").is_dir():
        print("[1/4] writing the toy world …", flush=True)
        write_toy_world(world, seed=args.seed, overwrite=True,
                        **(QUICK_WORLD if args.quick else {}))
    options = ["--configs", "toy"]
    overrides = [f"DATASETS.ROOT={world}", f"SEED={args.seed}", "DATALOADER.NUM_WORKERS=0"]
    if args.quick:
        options += ["--schedule-scale", str(QUICK_SCALE)]
        overrides += ["EXEMPLARS.PER_CLASS=3"]
    print("[2-3/4] training ORE and the closed-set baseline side by side "
          f"(logs: {out}/ore.log, {out}/baseline.log)", flush=True)
    runs = [out / "ore", out / "baseline"]
    scale = QUICK_SCALE if args.quick else 1.0
    bar = tqdm(total=2 * _planned_iterations(scale), desc="demo (both runs)", unit="it",
               dynamic_ncols=True)

    def progress():
        bar.n = min(bar.total, _done_iterations(runs))
        bar.refresh()

    with bar:
        _run_children({
            "ore": ["run-tasks", *options, "--output", str(runs[0]), *overrides],
            "baseline": ["run-tasks", *options, "--output", str(runs[1]), *overrides,
                         "MODEL.ROI_HEADS.NAME=standard"],
        }, out, progress)
    print("[4/4] writing the report …", flush=True)
    written = write_report(out, ore_run=out / "ore", baseline_run=out / "baseline",
                           toy_root=world, ore_config="toy/t4_train.yaml")
    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min: {out / 'report.html'}  {out / 'report.md'}  "
          f"{out / 'metrics.json'}")
    return 0 if written is not None else 1
