"""The main job: the whole open-world story on the toy world, and its report.

1. writes the toy world;
2. runs every task with the ORE head (train, exemplar finetune, energy fit, evaluation);
3. runs the closed-set Faster R-CNN on the same schedule (the baseline);
4. writes ``report.html`` (self-contained), ``report.md`` and ``metrics.json``.

The two runs go side by side in two worker processes with one thread each, which on a
2-core machine is faster than one after the other; each logs to ``<output>/<run>.log``.
Everything resumes: run it again after an interruption and finished stages are skipped.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ore.config import CONFIG_ROOT
from ore.data.toy import write_toy_world
from ore.demo.report import write_report
from ore.engine.layout import RunLayout
from ore.engine.metrics_log import read_metrics
from ore.engine.runtime import environment
from ore.engine.tasks import planned_iterations, run_tasks
from ore.errors import OreError
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


def _run_in_worker(log_file: str, config_dir: str, output: str, overrides: list[str],
                   schedule_scale: float) -> None:
    """One run of the schedule in a worker process, its output going to ``log_file``."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    run_tasks(config_dir, output, overrides, schedule_scale=schedule_scale)


def _run_side_by_side(jobs: dict[str, dict], progress) -> None:
    """Run each job in its own process; call ``progress()`` every 2 s until all end.

    The first failure is raised after every job has stopped (an OreError keeps its line).
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch
    # One thread per worker, no spinning.
    with environment(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"), \
            cf.ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
        futures = {pool.submit(_run_in_worker, **job): name for name, job in jobs.items()}
        pending = set(futures)
        while pending:
            _, pending = cf.wait(pending, timeout=2)
            progress()
    for future, name in futures.items():
        exc = future.exception()
        if exc is None:
            continue
        log_file = jobs[name]["log_file"]
        if isinstance(exc, OreError):
            raise OreError(f"demo run {name} failed: {exc} (log: {log_file})")
        raise OreError(f"demo run {name} failed ({type(exc).__name__}: {exc}); "
                       f"see {log_file}") from exc


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
        print("[1/4] writing the toy world …", flush=True)
        write_toy_world(world, seed=seed, overwrite=True, **(QUICK_WORLD if quick else {}))
    overrides = [f"DATASETS.ROOT={world}", f"SEED={seed}", "DATALOADER.NUM_WORKERS=0"]
    if quick:
        overrides += ["EXEMPLARS.PER_CLASS=3"]
    scale = QUICK_SCALE if quick else 1.0
    runs = {name: out / name for name in RUNS}
    print("[2-3/4] training ORE and the closed-set baseline side by side "
          f"(logs: {out}/ore.log, {out}/baseline.log)", flush=True)
    jobs = {name: dict(log_file=str(out / f"{name}.log"), config_dir=str(TOY_CONFIGS),
                       output=str(runs[name]), overrides=[*overrides, *extra],
                       schedule_scale=scale)
            for name, extra in RUNS.items()}
    total = sum(planned_iterations(TOY_CONFIGS, job["overrides"], scale) for job in jobs.values())
    with tqdm(total=total, desc="demo (both runs)", unit="it", dynamic_ncols=True) as bar:
        def progress():
            bar.n = min(bar.total, _done_iterations(list(runs.values())))
            bar.refresh()

        _run_side_by_side(jobs, progress)
    print("[4/4] writing the report …", flush=True)
    written = write_report(out, ore_run=runs["ore"], baseline_run=runs["baseline"],
                           toy_root=world, ore_config=REPORT_CONFIG)
    return {**written, "minutes": (time.perf_counter() - started) / 60}
