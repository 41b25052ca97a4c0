"""The main job: the whole open-world story on the toy world, and its report.

1. writes the toy world;
2. runs every task with the ORE head (train, exemplar finetune, energy fit, evaluation);
3. runs the closed-set Faster R-CNN on the same schedule (the baseline);
4. closes the open-world loop (:mod:`ore.demo.loop`): discovers the unknowns of the
   training images, names the clusters, learns them as the next task, and learns the same
   task from ground-truth boxes for comparison;
5. writes ``report.html`` (self-contained), ``report.md`` and ``metrics.json``.

The two runs of 2–3 go side by side in two worker processes with one thread each, which on
a 2-core machine is faster than one after the other; each logs to ``<output>/<run>.log``
(the two new tasks of 4 likewise). Everything resumes: run it again after an interruption
and finished stages are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from ore.config import CONFIG_ROOT
from ore.data.toy import write_toy_world
from ore.demo.loop import LOOP_DIR, run_loop
from ore.demo.report import write_report
from ore.demo.workers import Job, run_side_by_side
from ore.engine.layout import RunLayout
from ore.engine.metrics_log import read_metrics
from ore.engine.tasks import planned_iterations, run_tasks
from ore.fileio import check_output_dir, folder_lock

# quick: a smaller world and a schedule scaled down, for a check in about 3 minutes.
QUICK_WORLD = dict(images_per_task=40, val_images=20, test_images=30, exemplars_per_class=3)
QUICK_SCALE = 0.06
TOY_CONFIGS = CONFIG_ROOT / "toy"
# The config whose test split and task the report's sample detections use.
REPORT_CONFIG = "toy/t4_train.yaml"
RUNS = {"ore": [], "baseline": ["MODEL.ROI_HEADS.NAME=standard"]}


def _done_iterations(run_dirs: list[Path]) -> int:
    """Training iterations finished so far, from the runs' metrics logs."""
    done = 0
    for run_dir in run_dirs:
        for log_file in RunLayout(run_dir).metrics_logs():
            rows = read_metrics(log_file, ("iter",))
            done += rows[-1]["iter"] if rows else 0
    return done


def run_demo(output: str | Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Write the toy world, run ORE and the baseline, write the report; returns what
    :func:`ore.demo.report.write_report` returns plus ``"minutes"``."""
    out = check_output_dir(output)
    with folder_lock(out):  # one demo at a time in a folder
        return _run_demo(out, quick=quick, seed=seed)


def _run_demo(out: Path, *, quick: bool, seed: int) -> dict:
    started = time.perf_counter()
    world = out / "toy-data"
    if not (world / "ImageSets").is_dir():
        print("[1/5] writing the toy world …", flush=True)
        write_toy_world(world, seed=seed, overwrite=True, **(QUICK_WORLD if quick else {}))
    overrides = [f"DATASETS.ROOT={world}", f"SEED={seed}", "DATALOADER.NUM_WORKERS=0"]
    if quick:
        overrides += ["EXEMPLARS.PER_CLASS=3"]
    scale = QUICK_SCALE if quick else 1.0
    runs = {name: out / name for name in RUNS}
    print("[2-3/5] training ORE and the closed-set baseline side by side "
          f"(logs: {out}/ore.log, {out}/baseline.log)", flush=True)
    jobs = {name: Job(run_tasks, str(out / f"{name}.log"),
                      dict(config_dir=str(TOY_CONFIGS), output=str(runs[name]),
                           overrides=[*overrides, *extra], schedule_scale=scale))
            for name, extra in RUNS.items()}
    total = sum(planned_iterations(TOY_CONFIGS, job.kwargs["overrides"], scale)
                for job in jobs.values())
    with tqdm(total=total, desc="demo (both runs)", unit="it", dynamic_ncols=True) as bar:
        def progress():
            bar.n = min(bar.total, _done_iterations(list(runs.values())))
            bar.refresh()

        run_side_by_side(jobs, progress)
    print(f"[4/5] discovering the unknowns of the training images and learning them as a new "
          f"task (logs: {out / LOOP_DIR})", flush=True)
    loop = run_loop(out, runs["ore"], world, seed=seed, quick=quick)
    print("[5/5] writing the report …", flush=True)
    written = write_report(out, ore_run=runs["ore"], baseline_run=runs["baseline"],
                           toy_root=world, ore_config=REPORT_CONFIG, loop=loop)
    return {**written, "minutes": (time.perf_counter() - started) / 60}
