"""One run at a time in a folder: an OS lock (``fcntl.flock``) the kernel drops when its
holder dies, so a killed run never blocks the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ore.engine.layout import FINAL
from ore.errors import OreError
from ore.fileio import LOCK_FILE, folder_lock
from tests.reliability import train_args, user_error

REPO = Path(__file__).resolve().parents[1]


def test_a_second_run_into_a_locked_folder_names_the_folder_and_the_holder(
        capsys, tmp_path, toy_root):
    out = tmp_path / "run"
    with folder_lock(out):  # this process is the first run
        msg = user_error(capsys, train_args(out, toy_root))
        assert msg == (f"error: {out} is in use by another run (pid {os.getpid()}); wait for "
                       "it to end or choose another --output")
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert not (out / FINAL).exists()
        # run-tasks into the same folder is refused the same way, before any work.
        msg = user_error(capsys, ["run-tasks", "--configs", "toy", "--output", out,
                                  f"DATASETS.ROOT={toy_root}"])
        assert f"{out} is in use by another run (pid {os.getpid()})" in msg
    assert not (out / LOCK_FILE).exists()  # released and removed at the end


def test_the_lock_of_a_killed_run_is_released_by_the_kernel(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from ore.fileio import folder_lock\n"
         f"with folder_lock({str(folder)!r}):\n"
         "    print('locked', flush=True)\n"
         "    time.sleep(120)\n"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OreError, match=f"is in use by another run \\(pid {holder.pid}\\)"):
            with folder_lock(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (folder / LOCK_FILE).exists()  # left behind by kill -9 …
    with folder_lock(folder):  # … and free all the same
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
