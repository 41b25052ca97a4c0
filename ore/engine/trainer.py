"""The training loop: SGD with warmup and step decay, checkpoints, resume, metrics.

The learning rate is a pure function of the iteration (no scheduler state), so a
resumed run continues exactly where it stopped; a new task starts its own schedule.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ore.config import config_to_yaml
from ore.data.classes import TaskSplit, load_task_split
from ore.data.dataset import DetectionDataset, TrainTransform, make_train_loader, split_bad
from ore.data.records import apply_role, load_split
from ore.engine.checkpoint import Checkpointer
from ore.errors import OreError
from ore.fileio import atomic_save, atomic_write_text
from ore.modeling.detector import build_detector, checkpoint_meta, load_detector_weights

log = logging.getLogger(__name__)
FINAL = "model_final.pth"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OreError(f"DEVICE: {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OreError(f"DEVICE: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def lr_at(cfg: DictConfig, iteration: int) -> float:
    """Linear warmup from BASE_LR·WARMUP_FACTOR, then ×GAMMA at each of STEPS."""
    s = cfg.SOLVER
    factor = s.GAMMA ** sum(iteration >= step for step in s.STEPS)
    if iteration < s.WARMUP_ITERS:
        alpha = iteration / s.WARMUP_ITERS
        factor *= s.WARMUP_FACTOR * (1 - alpha) + alpha
    return s.BASE_LR * factor


def build_train_dataset(cfg: DictConfig, split: TaskSplit) -> DetectionDataset:
    d = cfg.DATASETS
    records = load_split(d.ROOT, d.TRAIN, split, d.FORMAT, d.IMAGE_DIR)
    records = apply_role(records, split, cfg.OWOD.TASK, d.TRAIN_ROLE)
    if not records:
        raise OreError(
            f"DATASETS.TRAIN {d.TRAIN!r} under {d.ROOT} has no image with a target after "
            f"{d.TRAIN_ROLE!r} filtering for task {cfg.OWOD.TASK}"
        )
    transform = TrainTransform(
        tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.FLIP_PROB
    )
    return DetectionDataset(records, split, transform)


class Trainer:
    """Trains one config into ``output_dir``; ``run()`` returns the final checkpoint path."""

    def __init__(self, cfg: DictConfig, output_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.out = Path(output_dir)
        self.resume = resume
        self.split = load_task_split(cfg.DATASETS.CLASSES)
        self.device = resolve_device(cfg.DEVICE)
        self.checkpointer = Checkpointer(self.out, cfg.SOLVER.KEEP_CHECKPOINTS)

    def _state(self, model, optimizer, iteration: int) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "rng": {"torch": torch.get_rng_state()},
            "meta": checkpoint_meta(self.cfg, self.split),
            "config": OmegaConf.to_container(self.cfg),
        }

    def run(self) -> Path:
        cfg = self.cfg
        final = self.out / FINAL
        if final.is_file() and self.resume:
            log.info("%s exists: training already finished", final)
            return final
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.SEED, cfg.DETERMINISTIC)
        dataset = build_train_dataset(cfg, self.split)
        model = build_detector(cfg, self.split)
        if cfg.MODEL.WEIGHTS:
            load_detector_weights(model, cfg.MODEL.WEIGHTS, self.split)
        model.to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=lr_at(cfg, 0), momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        start, rng_state = 0, None
        last = self.checkpointer.latest() if self.resume else None
        if last is not None:
            state = Checkpointer.load(last)
            load_detector_weights(model, str(last), self.split)
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["iteration"])
            rng_state = state["rng"]["torch"]
            log.info("resumed from %s at iteration %d", last, start)
        elif not self.resume and self.checkpointer.latest() is not None:
            raise OreError(f"{self.out} already holds checkpoints; pass --resume to continue "
                           "that run or choose another --output")
        atomic_write_text(self.out / "config.yaml", config_to_yaml(cfg))
        metrics_path = self.out / "metrics.jsonl"
        _truncate_metrics(metrics_path, start)
        self._loop(model, optimizer, dataset, start, metrics_path, rng_state)
        atomic_save(
            {"model": model.state_dict(), "meta": checkpoint_meta(cfg, self.split),
             "config": OmegaConf.to_container(cfg)},
            final,
        )
        return final

    def _loop(
        self, model, optimizer, dataset, start: int, metrics_path: Path, rng_state=None
    ) -> None:
        cfg = self.cfg
        max_iter = cfg.SOLVER.MAX_ITER
        if start >= max_iter:
            return
        loader = make_train_loader(
            dataset, cfg.SOLVER.IMS_PER_BATCH, num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=cfg.SEED, group=cfg.DATALOADER.ASPECT_RATIO_GROUPING, start_iter=start,
        )
        counters: dict = {}
        window: dict[str, list[float]] = {}
        bar = tqdm(total=max_iter, initial=start, desc="train", unit="it", dynamic_ncols=True)
        t_last = time.perf_counter()
        images_seen = 0
        data_time = 0.0
        it = iter(loader)  # draws from the global generator: restore the state after it
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        with open(metrics_path, "a") as metrics, bar:
            for iteration in range(start, max_iter):
                t0 = time.perf_counter()
                batch = split_bad(next(it), cfg.DATALOADER.SKIP_BAD_IMAGES, counters)
                data_time += time.perf_counter() - t0
                if not batch:
                    continue
                images = [b[0].to(self.device, non_blocking=True) for b in batch]
                targets = [{k: v.to(self.device) for k, v in b[1].items()} for b in batch]
                lr = lr_at(cfg, iteration)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses = model(images, targets)
                total = sum(losses.values())
                if not torch.isfinite(total):
                    good = self.checkpointer.latest()
                    raise OreError(
                        f"loss became {total.item()} at iteration {iteration + 1}; stopped. "
                        f"Last good checkpoint: {good or 'none'} (lower SOLVER.BASE_LR or "
                        f"set SOLVER.CLIP_GRAD_NORM)"
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if cfg.SOLVER.CLIP_GRAD_NORM > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]],
                        cfg.SOLVER.CLIP_GRAD_NORM,
                    )
                optimizer.step()
                images_seen += len(batch)
                for k, v in losses.items():
                    window.setdefault(k, []).append(float(v.detach()))
                window.setdefault("loss", []).append(float(total.detach()))
                done = iteration + 1
                bar.update(1)
                if done % cfg.SOLVER.LOG_PERIOD == 0 or done == max_iter:
                    now = time.perf_counter()
                    row = {"iter": done, "lr": lr}
                    row.update({k: float(np.mean(v)) for k, v in window.items()})
                    row["images_per_s"] = images_seen / max(now - t_last, 1e-9)
                    row["data_time"] = data_time
                    row.update(counters)
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2g}")
                    window.clear()
                    t_last, images_seen, data_time = now, 0, 0.0
                if done % cfg.SOLVER.CHECKPOINT_PERIOD == 0 and done < max_iter:
                    self.checkpointer.save(self._state(model, optimizer, done),
                                           f"model_{done:07d}.pth")


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop rows a resumed run will write again (those after its checkpoint)."""
    if not path.is_file():
        return
    if start == 0:
        path.unlink()
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("iter", 0) <= start]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

