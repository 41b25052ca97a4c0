"""Reading and writing weights: the package's one ``torch.load``, and periodic checkpoints.

Every file of weights a user hands in (``MODEL.WEIGHTS``, ``MODEL.BACKBONE.WEIGHTS``,
``ore detect --weights``, a checkpoint to resume from) is read by :func:`read_torch_file`
with ``weights_only=True`` (no code in a file can run) and one error mapping: a missing
or unreadable file is a one-line :class:`~ore.errors.OreError`, and so are weights that
hold NaN or infinite values (a model that would only ever detect nothing).

A periodic checkpoint holds the model, optimiser, GradScaler, iteration, every process's
random generator states, the class layout and the config. There is no scheduler state:
the learning rate is a function of the iteration, so a new task never inherits old
milestones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ore.data.classes import TaskSplit
from ore.errors import OreError
from ore.fileio import atomic_write, atomic_write_text
from ore.modeling.backbone import load_trunk_state
from ore.modeling.detector import OpenWorldRCNN, build_detector, load_detector_state
from ore.modeling.weight_files import read_pickle_weights

LAST = "last_checkpoint"

log = logging.getLogger(__name__)


def save_torch_file(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`ore.fileio.atomic_write` (temporary file, rename)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def read_torch_file(path: str | Path, *, kind: str = "checkpoint", setting: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU.

    Args:
        kind: what the file should be, for the message (``checkpoint``, ``state dict``).
        setting: the key or flag that named the file, prefixed to every message.
    """
    if not Path(path).exists():
        raise OreError(f"{setting}: file not found: {path}" if setting
                       else f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is the user's file
        what = f"not a readable {kind} ({type(exc).__name__})"
        raise OreError(f"{setting}: {path} is {what}" if setting else f"{path}: {what}") from None


def _nonfinite(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in ``obj`` (nested dicts) that hold NaN or ±inf."""
    if isinstance(obj, torch.Tensor):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return [prefix.rstrip(".")] if bad else []
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _nonfinite(v, f"{prefix}{key}.")]
    return []


def check_finite(obj: Any, path: str | Path, setting: str = "") -> None:
    """A one-line :class:`OreError` naming ``path`` when a weight tensor in ``obj`` holds
    NaN or infinite values."""
    bad = _nonfinite(obj)
    if bad:
        where = f"{setting}: {path}" if setting else str(path)
        raise OreError(f"{where}: {len(bad)} weight tensors hold NaN or infinite values "
                       f"(e.g. {bad[0]}); these weights cannot be used")


class _StoredArguments:
    """What a pickled ``argparse.Namespace`` becomes when read: its attributes, no code."""


def read_trunk_weights(path: str | Path) -> Any:
    """The contents of a ``MODEL.BACKBONE.WEIGHTS`` file (checked by the trunk loader).

    A ``.pkl`` file (MSRA / detectron2 weights) is read by
    :func:`ore.modeling.weight_files.read_pickle_weights`, which builds numpy arrays and
    nothing else; any other file by :func:`read_torch_file`, where an ``argparse.Namespace``
    (DINO training checkpoints keep their arguments in one) is read as a plain
    :class:`_StoredArguments` holding its attributes.
    """
    setting = "MODEL.BACKBONE.WEIGHTS"
    if Path(path).suffix.lower() == ".pkl":
        obj = read_pickle_weights(path)
    else:
        with torch.serialization.safe_globals([(_StoredArguments, "argparse.Namespace")]):
            obj = read_torch_file(path, kind="state dict", setting=setting)
    check_finite(obj, path, setting)
    return obj


def load_trunk_weights(trunk: nn.Module, path: str | Path) -> None:
    """Read a trunk's weights file and load it into ``trunk`` (strict key checks)."""
    load_trunk_state(trunk, read_trunk_weights(path), str(path))


def load_detector_weights(model: nn.Module, path: str | Path, split: TaskSplit) -> dict:
    """Read a detector checkpoint and load it into ``model``; returns its meta."""
    ckpt = read_torch_file(path)
    meta = load_detector_state(model, ckpt, split, str(path))  # checks its structure
    check_finite(ckpt["model"], path)
    return meta


def build_model(cfg: DictConfig, split: TaskSplit, weights: str | Path | None = None
                ) -> OpenWorldRCNN:
    """The detector of ``cfg`` with its pretrained trunk (``MODEL.BACKBONE.WEIGHTS``) and,
    when given, a full detector checkpoint on top."""
    trunk = cfg.MODEL.BACKBONE.WEIGHTS
    model = build_detector(cfg, split, backbone_weights=read_trunk_weights(trunk) if trunk
                           else None)
    if weights is not None:
        load_detector_weights(model, weights, split)
    return model


class Checkpointer:
    """Periodic checkpoints ``model_<iter>.pth`` in a folder, the newest K kept.

    ``last_checkpoint`` names the newest complete one; it is updated only after the
    checkpoint itself is on disk, so it never points at a partial file.
    """

    def __init__(self, folder: str | Path, keep: int = 3):
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def save(self, state: dict, name: str, periodic: bool = True) -> Path:
        path = save_torch_file(state, self.folder / name)
        atomic_write_text(self.folder / LAST, name + "\n")
        if periodic:
            self._prune()
        return path

    def periodic(self) -> list[Path]:
        """The periodic checkpoints in the folder, oldest first."""
        return sorted(self.folder.glob("model_[0-9]*.pth"))

    def _prune(self) -> None:
        for old in self.periodic()[: -self.keep]:
            old.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed process left behind (never read; just clutter)."""
        stale = list(self.folder.glob(".*.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def latest(self) -> Path | None:
        marker = self.folder / LAST
        if not marker.is_file():
            return None
        path = self.folder / marker.read_text().strip()
        return path if path.is_file() else None

    def newest_readable(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that reads whole, and its contents: the one
        ``last_checkpoint`` names, then the periodic ones newest first. Each one skipped
        is logged with the reason. None when the folder holds no checkpoint at all; a
        one-line :class:`OreError` when it holds some and none is readable."""
        marker = self.folder / LAST
        named = self.folder / marker.read_text().strip() if marker.is_file() else None
        if named is not None and not named.is_file():
            log.warning("%s names %s, which is missing; looking for an older checkpoint",
                        marker, named.name)
        candidates = [named] if named is not None and named.is_file() else []
        candidates += [p for p in reversed(self.periodic()) if p not in candidates]
        skipped = []
        for path in candidates:
            try:
                state = read_torch_file(path)
                if not isinstance(state, dict) or "model" not in state or (
                        "iteration" not in state):
                    raise OreError(f"{path}: not a periodic checkpoint (no model or iteration)")
                check_finite(state["model"], path)
            except OreError as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
                skipped.append(path.name)
                continue
            if skipped:
                log.warning("resuming from %s (skipped the newer %s)", path.name,
                            ", ".join(skipped))
            return path, state
        if skipped:
            raise OreError(f"{self.folder}: none of its checkpoints is readable "
                           f"({', '.join(skipped)}); nothing to resume from: remove them or "
                           "choose another --output")
        return None
