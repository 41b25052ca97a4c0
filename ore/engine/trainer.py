"""The training loop: SGD with warmup and step decay, checkpoints, resume, metrics.

The learning rate is a pure function of the iteration (no scheduler state), so a
resumed run continues exactly where it stopped; a new task starts its own schedule, at
iteration ``SOLVER.START_ITER`` (0, or where the previous task's counter stopped when a
schedule continues one counter across tasks, as the reference did).

Several processes (``torchrun --nproc_per_node N -m ore train …``): ``SOLVER.IMS_PER_BATCH``
is the global batch, each process reads ``IMS_PER_BATCH / N`` images of it, gradients
are averaged by DistributedDataParallel, and only rank 0 writes checkpoints, metrics and
the progress bar (see :mod:`ore.engine.distributed`).

The run folder is locked while a run writes into it (:func:`ore.fileio.folder_lock`), and
a folder that holds a run is never written into without ``resume`` (continue it) or
``overwrite`` (replace it).

Mixed precision (``SOLVER.AMP``): ``bf16`` autocasts the forward pass on CUDA or CPU;
``fp16`` (CUDA only) also scales the loss with a GradScaler whose state is checkpointed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ore.config import config_to_yaml
from ore.contrastive import distributed as collective
from ore.data.classes import TaskSplit, load_task_split
from ore.data.dataset import (
    DetectionDataset,
    TrainTransform,
    make_train_loader,
    note_size_mismatches,
    split_bad,
)
from ore.data.records import load_dataset_split
from ore.engine import distributed as ddp
from ore.engine.checkpoint import LAST, Checkpointer, build_model, read_torch_file, save_torch_file
from ore.engine.layout import CONFIG, FINAL
from ore.engine.metrics_log import FILE as METRICS_FILE
from ore.engine.metrics_log import MetricsLog, truncate_metrics
from ore.engine.runtime import (
    amp_dtype,
    build_optimizer,
    get_rng_state,
    lr_at,
    resolve_device,
    seed_everything,
    set_rng_state,
)
from ore.errors import OreError
from ore.fileio import atomic_write_text, check_output_dir, folder_lock
from ore.modeling.detector import checkpoint_meta, load_detector_state

log = logging.getLogger(__name__)


def build_train_dataset(cfg: DictConfig, split: TaskSplit) -> DetectionDataset:
    d = cfg.DATASETS
    records = load_dataset_split(d, d.TRAIN, split, cfg.OWOD.TASK, d.TRAIN_ROLE)
    if not records:
        raise OreError(
            f"DATASETS.TRAIN {d.TRAIN!r} under {d.ROOT} has no image with a target after "
            f"{d.TRAIN_ROLE!r} filtering for task {cfg.OWOD.TASK}"
        )
    transform = TrainTransform(
        tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.FLIP_PROB
    )
    return DetectionDataset(records, split, transform, max_pixels=cfg.INPUT.MAX_PIXELS)


class Trainer:
    """Trains one config into ``output_dir``; ``run()`` returns the final checkpoint path.

    Args:
        resume: continue the run in ``output_dir`` from its newest readable checkpoint
            (a finished run is left as it is).
        overwrite: replace the run in ``output_dir`` (its weights, config and log; no
            other file there is touched).
    """

    def __init__(self, cfg: DictConfig, output_dir: str | Path, resume: bool = False,
                 overwrite: bool = False):
        if resume and overwrite:
            raise OreError("--resume and --overwrite exclude each other: continue the run "
                           "or replace it")
        self.cfg = cfg
        self.out = Path(output_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.split = load_task_split(cfg.DATASETS.CLASSES)
        self.device = resolve_device(cfg.DEVICE)
        self.checkpointer = Checkpointer(self.out, cfg.SOLVER.KEEP_CHECKPOINTS)
        self.dist = ddp.DistInfo()

    def _state(self, model, optimizer, scaler, iteration: int) -> dict:
        # Every process's generators, so that each continues its own stream on resume.
        rng = collective.gather_objects(get_rng_state())
        return {
            "model": ddp.unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "iteration": iteration,
            "rng": {**rng[0], "per_rank": rng},
            "world_size": self.dist.world_size,
            "meta": checkpoint_meta(self.cfg, self.split),
            "config": OmegaConf.to_container(self.cfg),
        }

    def run_files(self) -> list[Path]:
        """The files of a run in the output folder: weights, config, log."""
        names = (FINAL, CONFIG, LAST, METRICS_FILE)
        return [*(self.out / n for n in names if (self.out / n).is_file()),
                *self.checkpointer.periodic()]

    def _check_folder(self) -> None:
        """A folder holding a run is written into only to continue or replace that run."""
        found = self.run_files()
        if found and not (self.resume or self.overwrite):
            shown = ", ".join(p.name for p in found[:3]) + (", …" if len(found) > 3 else "")
            raise OreError(f"{self.out} already holds a run ({shown}); pass --resume to "
                           "continue that run, --overwrite to replace it, or choose another "
                           "--output")

    def run(self) -> Path:
        self.dist = ddp.init_from_env(self.device)
        cfg, info = self.cfg, self.dist
        device = self.device = ddp.process_device(self.device, info)
        check_output_dir(self.out)
        final = self.out / FINAL
        if final.is_file() and self.resume:
            log.info("%s exists: training already finished", final)
            return final
        self._check_folder()
        # Everything a user can get wrong is checked before the first file is written.
        batch = ddp.per_process_batch(cfg.SOLVER.IMS_PER_BATCH, info.world_size)
        dtype = amp_dtype(cfg.SOLVER.AMP, device)
        seed_everything(cfg.SEED, cfg.DETERMINISTIC)
        dataset = build_train_dataset(cfg, self.split)
        # Built from the same seed in every process (DDP also broadcasts rank 0's weights).
        model = build_model(cfg, self.split, cfg.MODEL.WEIGHTS or None)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg, params)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.SOLVER.AMP == "fp16")
        if info.distributed:
            # RPN and RoI sampling draw from the global generator: a stream per process.
            torch.manual_seed(cfg.SEED + info.rank)
        # Only rank 0 writes; it holds the folder's lock until the final weights are written.
        with folder_lock(self.out) if info.is_main else contextlib.nullcontext():
            if info.is_main:
                self._check_folder()  # again, now that no other run can start here
                if self.overwrite:
                    for p in self.run_files():
                        p.unlink()
            first = int(cfg.SOLVER.START_ITER)
            start, rng_state = first, None
            last, state = self._resume_point()
            if last is not None:
                load_detector_state(model, state, self.split, str(last))  # checks its structure
                optimizer.load_state_dict(state["optimizer"])
                if state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                start = int(state["iteration"])
                rng_state = self._rng_for_this_process(state, start)
                log.info("resumed from %s at iteration %d", last, start)
            elif first > 0 and hasattr(model.roi_heads, "set_iteration"):
                # One counter across tasks: the prototype schedule counts on it too.
                model.roi_heads.set_iteration(first)
            if info.is_main:
                self.checkpointer.remove_stale_temporaries()
                atomic_write_text(self.out / CONFIG, config_to_yaml(cfg))
                truncate_metrics(self.out / METRICS_FILE, start)
            model = ddp.wrap_model(model, device, info)
            self._loop(model, optimizer, scaler, dataset, batch, dtype, start, rng_state)
            if info.is_main:
                save_torch_file(
                    {"model": ddp.unwrap(model).state_dict(),
                     "meta": checkpoint_meta(cfg, self.split),
                     "config": OmegaConf.to_container(cfg)},
                    final,
                )
        collective.barrier()
        return final

    def _resume_point(self) -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from and its contents (read once: weights, optimiser,
        RNG, iteration), or (None, None) to start at SOLVER.START_ITER. Rank 0 chooses the newest
        readable one; every process resumes from that same file."""
        found = self.checkpointer.newest_readable() if self.resume and self.dist.is_main \
            else None
        chosen = collective.broadcast_object(str(found[0]) if found else None)
        if chosen is None:
            return None, None
        return Path(chosen), found[1] if found else read_torch_file(chosen)

    def _rng_for_this_process(self, state: dict, start: int) -> dict | None:
        rng = state.get("rng") or {}
        per_rank = rng.get("per_rank")
        if per_rank and len(per_rank) == self.dist.world_size:
            return per_rank[self.dist.rank]
        if not self.dist.distributed and "torch" in rng:
            return rng
        log.warning("checkpoint was written by %s processes, this run has %d: random "
                    "streams restart from SEED (the run is not bit-identical to an "
                    "uninterrupted one)", len(per_rank or [1]), self.dist.world_size)
        torch.manual_seed(self.cfg.SEED + 1000003 * start + self.dist.rank)
        return None

    def _loop(self, model, optimizer, scaler, dataset, batch_size: int, dtype, start: int,
              rng_state=None) -> None:
        cfg, info, device = self.cfg, self.dist, self.device
        max_iter, first = cfg.SOLVER.MAX_ITER, cfg.SOLVER.START_ITER
        if start >= max_iter:
            return
        loader = make_train_loader(
            dataset, batch_size, num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=cfg.SEED, group=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            start_iter=start - first, rank=info.rank, world_size=info.world_size,
        )
        counters: dict = {}
        mismatched: set[str] = set()  # images whose size differs from their annotation's
        window: dict[str, list[float]] = {}
        bar = tqdm(total=max_iter - first, initial=start - first, desc="train", unit="it",
                   dynamic_ncols=True, disable=not info.is_main)
        t_last = time.perf_counter()
        images_seen, data_time, window_start = 0, 0.0, start + 1
        it = iter(loader)  # draws from the global generator: restore the state after it
        if rng_state is not None:
            set_rng_state(rng_state)
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        metrics = MetricsLog(self.out / METRICS_FILE) if info.is_main else None
        with bar, metrics or contextlib.nullcontext():
            for iteration in range(start, max_iter):
                t0 = time.perf_counter()
                batch = split_bad(next(it), cfg.DATALOADER.SKIP_BAD_IMAGES, counters)
                note_size_mismatches(batch, counters, mismatched)
                data_time += time.perf_counter() - t0
                # Every process must take part in every step: if any has nothing left
                # after skipping bad images, all skip this iteration.
                sizes = collective.all_reduce_sum(
                    torch.tensor([len(batch), int(not batch)], device=device))
                if not int(sizes[1]):
                    logged = self._step(model, optimizer, scaler, autocast, batch, iteration)
                    images_seen += int(sizes[0])
                    for k, v in logged.items():
                        window.setdefault(k, []).append(v)
                done = iteration + 1
                bar.update(1)
                log_now = done % cfg.SOLVER.LOG_PERIOD == 0 or done == max_iter
                if log_now and not window:
                    raise OreError(
                        f"no readable image in iterations {window_start}-{done}: every image "
                        f"drawn was skipped as unreadable ({counters.get('bad_images', 0)} so "
                        f"far); check {cfg.DATASETS.ROOT}")
                if metrics is not None and log_now:
                    now = time.perf_counter()
                    row = {"iter": done, "lr": lr_at(cfg, iteration)}
                    row.update({k: float(np.mean(v)) for k, v in window.items()})
                    # Images over all processes per second of this process's wall time.
                    row["images_per_s"] = images_seen / max(now - t_last, 1e-9)
                    row["data_time"] = data_time
                    if device.type == "cuda":  # this process's peak since the run started
                        row["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    row.update(counters)
                    metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2g}")
                if log_now:
                    window.clear()
                    t_last, images_seen, data_time = time.perf_counter(), 0, 0.0
                    window_start = done + 1
                if done % cfg.SOLVER.CHECKPOINT_PERIOD == 0 and done < max_iter:
                    state = self._state(model, optimizer, scaler, done)  # collective
                    if info.is_main:
                        self.checkpointer.save(state, f"model_{done:07d}.pth")

    def _step(self, model, optimizer, scaler, autocast, batch: list, iteration: int) -> dict:
        """One SGD step on this process's ``batch``; returns the losses averaged over
        processes (``loss`` is their sum)."""
        cfg, device = self.cfg, self.device
        images = [b[0].to(device, non_blocking=True) for b in batch]
        targets = [{k: v.to(device) for k, v in b[1].items()} for b in batch]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, iteration)
        with autocast:
            losses = model(images, targets)
        names = sorted(losses)
        total = sum(losses[k].float() for k in names)
        # A non-finite loss in any process stops every process at the same iteration.
        logged = collective.all_reduce_mean(
            torch.stack([losses[k].detach().float() for k in names] + [total.detach()])
        ).tolist()
        if not np.isfinite(logged[-1]):
            good = self.checkpointer.latest()
            raise OreError(
                f"loss became {logged[-1]} at iteration {iteration + 1}; stopped. "
                f"Last good checkpoint: {good or 'none'} (lower SOLVER.BASE_LR or "
                f"set SOLVER.CLIP_GRAD_NORM)"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if cfg.SOLVER.CLIP_GRAD_NORM > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]],
                cfg.SOLVER.CLIP_GRAD_NORM,
            )
        scaler.step(optimizer)
        scaler.update()
        return dict(zip([*names, "loss"], logged))
