"""Crash-safe files: write to a temporary name, fsync, rename; keep the last K checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ore.errors import OreError

LAST = "last_checkpoint"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it.

    A reader never sees a half-written file, and a crash leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
