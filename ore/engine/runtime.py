"""What every run sets up the same way: the device, the seeds, the random generators'
state, mixed precision, and the learning-rate schedules.

Both training loops (the detector's and the backbone pretraining) take their device,
seeding and schedule from here. A schedule is a pure function of how far the run is, so
a resumed run continues exactly where it stopped and holds no scheduler state.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from ore.errors import OreError

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None, setting: str = "DEVICE") -> torch.device:
    """``auto`` (or None, a flag not given): CUDA when available, else the CPU; otherwise
    the named device. ``setting`` names the key or flag in error messages.
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OreError(f"{setting}: {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OreError(f"{setting}: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block (for worker processes started
    inside it, e.g. ``OMP_NUM_THREADS``, read by their torch at import), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def get_rng_state() -> dict:
    """Every random generator a training process draws from (checkpoint-safe types only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's MT19937 keys as a tensor: checkpoints load with weights_only=True,
        # which refuses numpy arrays.
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"],
                             s["has_gauss"], s["cached_gaussian"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``SOLVER.AMP`` on ``device`` (None = full precision)."""
    if mode not in AMP_MODES:
        raise OreError(f"SOLVER.AMP: {mode!r}; expected one of {sorted(AMP_MODES)}")
    if mode == "fp16" and device.type != "cuda":
        raise OreError(f"SOLVER.AMP: fp16 needs a CUDA device, this run uses {device}; "
                       "use bf16 (CPU autocast) or off")
    return AMP_MODES[mode]


OPTIMIZERS = ("SGD", "AdamW")


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` over ``params`` at the schedule's first learning rate."""
    s = cfg.SOLVER
    lr = lr_at(cfg, s.START_ITER)
    if s.OPTIMIZER == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)
    if s.OPTIMIZER == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=s.WEIGHT_DECAY)
    raise OreError(f"SOLVER.OPTIMIZER: {s.OPTIMIZER!r}; expected one of {OPTIMIZERS}")


def lr_at(cfg: DictConfig, iteration: int) -> float:
    """The detector's schedule (``cfg.SOLVER``) at ``iteration`` of the run's counter
    (which starts at START_ITER): linear warmup from BASE_LR·WARMUP_FACTOR up to
    iteration WARMUP_ITERS, then ×GAMMA at each of STEPS."""
    s = cfg.SOLVER
    factor = s.GAMMA ** sum(iteration >= step for step in s.STEPS)
    if iteration < s.WARMUP_ITERS:
        alpha = iteration / s.WARMUP_ITERS
        factor *= s.WARMUP_FACTOR * (1 - alpha) + alpha
    return s.BASE_LR * factor


def cosine_lr(progress: float, base_lr: float, warmup: float = 0.02) -> float:
    """The pretraining schedule: linear warmup over the first ``warmup`` of the run, then
    cosine decay to zero, on ``progress`` ∈ [0, 1] (steps or time, whichever is further)."""
    if progress < warmup:
        return base_lr * (progress / warmup + 1e-3)
    p = (progress - warmup) / (1 - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
