"""Crash-safe file writes, output-path checks, folder locks, and the JSON and YAML readers.

Writes go to a temporary file beside the target, fsync, then rename: a reader never sees
a half-written file, and a crash leaves the previous file intact. Output paths are
checked before a command starts its work (:func:`check_output_dir`,
:func:`check_output_file`), and a folder a run writes into is locked while it does
(:func:`folder_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from ore.errors import OreError


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


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700 entries; outputs get the usual umask-based modes instead.
_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OreError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj) -> Path:
    """JSON with two-space indent; NaN is refused (use None for undefined figures)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (any
    existing folder there is removed), on failure it is deleted and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, flag: str, shown: Path) -> None:
    """``path`` (not existing yet) can be created: its nearest existing ancestor is a
    folder this process may write into."""
    anc = _nearest_existing(path.absolute().parent)
    if not anc.is_dir():
        raise OreError(f"{flag}: cannot create {shown}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OreError(f"{flag}: cannot create {shown}: no permission to write into {anc}")


def check_output_dir(path: str | Path, flag: str = "--output") -> Path:
    """Check that ``path`` is a folder a command can write into (existing or creatable),
    before the command starts its work; a one-line :class:`OreError` naming ``flag``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OreError(f"{flag}: {path} is a file; give a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OreError(f"{flag}: no permission to write into {path}")
    else:
        _check_creatable(path, flag, path)
    return path


def check_output_file(path: str | Path, flag: str = "--output") -> Path:
    """Check that ``path`` names a file a command can write (existing or creatable),
    before the command starts its work; a one-line :class:`OreError` naming ``flag``."""
    path = Path(path)
    if path.is_dir():
        raise OreError(f"{flag}: {path} is a folder; give a file name")
    if path.exists():
        if not os.access(path.absolute().parent, os.W_OK | os.X_OK):
            raise OreError(f"{flag}: no permission to write into {path.absolute().parent}")
    else:
        _check_creatable(path, flag, path)
    return path


# The lock file of a folder in use (see folder_lock); it holds the pid of the process.
LOCK_FILE = ".ore.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, flag: str = "--output") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created when missing) for the block.

    The lock is ``fcntl.flock`` on ``<folder>/.ore.lock``, which records the holder's pid.
    The kernel drops it when the holder ends, however it ends (``kill -9`` included), so
    a lock file left by a killed process never blocks a later one. A second process gets
    a one-line :class:`OreError` naming the folder and the holder's pid.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OreError(f"{flag}: cannot create {folder}: {exc.strerror or exc}") from None
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                pid = path.read_text().strip() or "unknown"
            except OSError:
                pid = "unknown"
            raise OreError(f"{folder} is in use by another run (pid {pid}); wait for it to "
                           f"end or choose another {flag}") from None
        # A holder that was releasing may have removed the file between our open and our
        # lock: the lock counts only on the file that is at the path now.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # removed while still held, then released
        os.close(fd)


def read_json(path: str | Path):
    """The JSON document in ``path``; a one-line :class:`OreError` when it is not one."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OreError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # absurdly deep nesting
        raise OreError(f"{path}: not valid JSON (nested too deeply)") from None


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML document gives the same key twice."""

    def __init__(self, key: str, first_line: int, second_line: int):
        super().__init__(f"key {key} is given twice (lines {first_line} and {second_line})")
        self.key, self.lines = key, (first_line, second_line)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (where the safe
    loader keeps the last silently); everything else is ``yaml.safe_load``'s."""

    def construct_document(self, node):
        _check_unique_keys(node, "", set())
        return super().construct_document(node)


def _check_unique_keys(node, prefix: str, visited: set[int]) -> None:
    """Walk the composed node tree; keys are named by their dotted path (``SOLVER.STEPS``)."""
    if id(node) in visited:  # an alias seen before (and recursive documents)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            is_scalar = isinstance(key_node, yaml.ScalarNode)
            if is_scalar and key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = f"{prefix}{key_node.value}" if is_scalar else None
            if name is not None:
                line = key_node.start_mark.line + 1
                if name in first:
                    raise DuplicateKeyError(name, first[name], line)
                first[name] = line
            _check_unique_keys(value_node, f"{name}." if name else prefix, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{prefix[:-1] if prefix else ''}[{i}].", visited)


def read_yaml(path: str | Path):
    """The YAML document in ``path``, read as ``yaml.safe_load`` reads it (no tags that
    build Python objects) except that a key given twice in a mapping is an error; a
    one-line :class:`OreError` when it is not valid YAML."""
    try:
        return yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)  # a SafeLoader
    except DuplicateKeyError as exc:
        raise OreError(f"{path}: {exc}; keep one of them") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OreError(f"{path}: not valid YAML ({exc})") from None
