"""Periodic checkpoints, written atomically, the newest K kept.

A checkpoint holds the model, optimiser, GradScaler, iteration, every process's random
generator states, the class layout and the config. There is no scheduler state: the
learning rate is a function of the iteration, so a new task never inherits old milestones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ore.errors import OreError
from ore.fileio import atomic_save, atomic_write_text

LAST = "last_checkpoint"


class Checkpointer:
    """Periodic checkpoints ``model_<iter>.pth`` in a folder, the newest K kept.

    ``last_checkpoint`` names the newest complete one; it is updated only after the
    checkpoint itself is on disk, so it never points at a partial file.
    """

    def __init__(self, folder: str | Path, keep: int = 3):
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def save(self, state: dict, name: str, periodic: bool = True) -> Path:
        path = atomic_save(state, self.folder / name)
        atomic_write_text(self.folder / LAST, name + "\n")
        if periodic:
            self._prune()
        return path

    def _prune(self) -> None:
        periodic = sorted(self.folder.glob("model_[0-9]*.pth"))
        for old in periodic[: -self.keep]:
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

    @staticmethod
    def load(path: str | Path) -> dict:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's problem
            raise OreError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
        if not isinstance(obj, dict) or "model" not in obj:
            raise OreError(f"{path}: not an ORE checkpoint (no 'model' entry)")
        return obj
