"""``metrics.jsonl``: one JSON object per line, appended as a run goes.

The one writer (:class:`MetricsLog`) and the one reader (:func:`read_metrics`) of the
training logs of both loops. A line cut short by a killed process is skipped when read
and dropped by :func:`truncate_metrics` when a run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ore.fileio import atomic_write_text

FILE = "metrics.jsonl"


class MetricsLog:
    """Appends rows to a ``metrics.jsonl``; each row is flushed as it is written.

    Args:
        path: the log file (its folder is created).
        fresh: start an empty log instead of appending to an existing one.
    """

    def __init__(self, path: str | Path, *, fresh: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w" if fresh else "a")  # noqa: SIM115 - closed in close()

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def read_metrics(path: str | Path, keys: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a log that hold every one of ``keys``; ``[]`` when there is no log."""
    path = Path(path)
    if not path.is_file():
        return []
    return [row for _, row in _rows(path) if all(k in row for k in keys)]


def truncate_metrics(path: str | Path, start: int, key: str = "iter") -> None:
    """Drop the rows a run resumed at ``start`` will write again (``row[key] > start``);
    ``start == 0`` removes the log."""
    path = Path(path)
    if not path.is_file():
        return
    if start == 0:
        path.unlink()
        return
    keep = [line for line, row in _rows(path) if row.get(key, 0) <= start]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
