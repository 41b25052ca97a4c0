"""The package as a user installs it: a wheel that carries its configs and runs from any
folder, without the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_configs_and_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(wheels), str(REPO)], check=True, cwd=tmp_path, timeout=600)
    (wheel,) = wheels.glob("ore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "ore" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names
    assert "ore/cli/__init__.py" in names and not any(n.startswith("tests/") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import ore.config as c; print(c.__file__); print(c.CONFIG_ROOT)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    module_file, config_root = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(config_root).is_relative_to(site)
    shown = subprocess.run([str(site / "bin" / "ore"), "config", "show", "toy/t1_train.yaml"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "NAME: tiny_fpn" in shown.stdout and "TASK: 1" in shown.stdout
