"""Jobs of the demo in worker processes side by side, one thread each (on a 2-core machine
two such workers finish sooner than the same jobs one after the other)."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ore.engine.runtime import environment
from ore.errors import OreError


@dataclass(frozen=True)
class Job:
    """``fn(**kwargs)`` in a worker, its output going to ``log_file``; ``fn`` is a function
    of a module (a spawned worker imports it by name)."""

    fn: Callable
    log_file: str
    kwargs: dict = field(default_factory=dict)


def _run_in_worker(fn: Callable, log_file: str, kwargs: dict) -> None:
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    fn(**kwargs)


def run_side_by_side(jobs: dict[str, Job], progress: Callable[[], None]) -> None:
    """Run each job in its own process; call ``progress()`` every 2 s until all end.

    The first failure is raised after every job has stopped (an OreError keeps its line).
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch
    # One thread per worker, no spinning.
    with environment(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"), \
            cf.ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
        futures = {pool.submit(_run_in_worker, job.fn, job.log_file, job.kwargs): name
                   for name, job in jobs.items()}
        pending = set(futures)
        while pending:
            _, pending = cf.wait(pending, timeout=2)
            progress()
    for future, name in futures.items():
        exc = future.exception()
        if exc is None:
            continue
        log_file = jobs[name].log_file
        if isinstance(exc, OreError):
            raise OreError(f"demo run {name} failed: {exc} (log: {log_file})")
        raise OreError(f"demo run {name} failed ({type(exc).__name__}: {exc}); "
                       f"see {log_file}") from exc
