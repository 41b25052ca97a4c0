"""The run folder of ``ore run-tasks``: where each task's stages, fits and figures live.

::

    <run>/summary.json                 {"t1": {"train": metrics, "ft": …, "ebui": …,
                                               "reported": stage}, …}
    <run>/tN_train/                    training of task N (weights, config, metrics.jsonl)
    <run>/tN_train/eval.json           its evaluation on DATASETS.TEST
    <run>/tN_ft/exemplars.txt          the balanced exemplar list of the finetune
    <run>/tN_ft/                       the exemplar finetune (same files as tN_train)
    <run>/<final stage>/energy/        energy fit of the task's final model (json + png)
    <run>/<final stage>/eval_ebui.json its evaluation with the energy-based identifier

The run-tasks schedule, the demo, its report and the tools find these files through
:class:`RunLayout` and the names below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ore.config import load_config
from ore.engine.metrics_log import FILE as METRICS_FILE
from ore.errors import OreError
from ore.fileio import atomic_write_json, read_json

# A task's stages in the order they run; the last one present gives the task's figures.
# ``ebui`` is the final model evaluated with the energy-based identifier (no folder).
STAGES = ("train", "ft", "ebui")
FOLDER_STAGES = ("train", "ft")
FINAL = "model_final.pth"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
EVAL = "eval.json"
EVAL_EBUI = "eval_ebui.json"
EXEMPLARS = "exemplars.txt"
ENERGY_DIR = "energy"
ENERGY_FIT = "energy_fit.json"
ENERGY_PLOT = "energy.png"

_TASK = re.compile(r"t(\d+)")


def task_key(task: int) -> str:
    """``3`` → ``"t3"``, the key of a task in ``summary.json`` and in folder names."""
    return f"t{task}"


def task_number(key: str) -> int:
    """``"t3"`` → ``3``; an :class:`OreError` for any other key."""
    m = _TASK.fullmatch(key)
    if not m:
        raise OreError(f"summary.json: key {key!r} is not a task (expected t1, t2, …)")
    return int(m.group(1))


REPORTED = "reported"  # summary key: the stage run-tasks reports for a task


def final_stage(stages: dict | None) -> str | None:
    """The stage whose figures stand for a task.

    The stage named under ``"reported"`` when the summary says so (run-tasks does, see
    ``EBUI.REPORTED``) and it has figures; otherwise the last of :data:`STAGES` with
    results: ``"ebui"`` when present, else ``"ft"``, else ``"train"``; ``None`` when no
    stage has figures. Stages with another name are ignored.
    """
    chosen = (stages or {}).get(REPORTED)
    if chosen in STAGES and stages.get(chosen) is not None:
        return chosen
    for stage in reversed(STAGES):
        if (stages or {}).get(stage) is not None:
            return stage
    return None


def final_metrics(stages: dict | None) -> dict | None:
    stage = final_stage(stages)
    return None if stage is None else stages[stage]


@dataclass(frozen=True)
class RunLayout:
    """The files of one ``ore run-tasks`` output folder ``root``."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def stage_dir(self, task: int, stage: str) -> Path:
        if stage not in FOLDER_STAGES:
            raise ValueError(f"stage {stage!r} has no folder; expected one of {FOLDER_STAGES}")
        return self.root / f"{task_key(task)}_{stage}"

    def final_weights(self, task: int, stage: str) -> Path:
        return self.stage_dir(task, stage) / FINAL

    def eval_file(self, task: int, stage: str) -> Path:
        return self.stage_dir(task, stage) / EVAL

    def exemplar_list(self, task: int) -> Path:
        return self.stage_dir(task, "ft") / EXEMPLARS

    @staticmethod
    def energy_dir(stage_dir: Path) -> Path:
        """The energy fit of the model trained in ``stage_dir``."""
        return stage_dir / ENERGY_DIR

    @staticmethod
    def ebui_eval_file(stage_dir: Path) -> Path:
        return stage_dir / EVAL_EBUI

    def latest_stage_dirs(self, task: int) -> list[Path]:
        """A task's stage folders, latest first (``tN_ft``, then ``tN_train``)."""
        return [self.stage_dir(task, stage) for stage in reversed(FOLDER_STAGES)]

    def find_weights(self, task: int) -> Path | None:
        """The final weights of a task's latest finished stage."""
        for d in self.latest_stage_dirs(task):
            if (d / FINAL).is_file():
                return d / FINAL
        return None

    @staticmethod
    def stage_energy_file(stage_dir: Path, name: str = ENERGY_FIT) -> Path | None:
        """A file of the energy fit of one stage: ``<stage>/energy/<name>`` (as run-tasks
        writes it) or ``<stage>/<name>``; None when neither exists."""
        for p in (RunLayout.energy_dir(stage_dir) / name, stage_dir / name):
            if p.is_file():
                return p
        return None

    def find_energy_file(self, task: int, name: str = ENERGY_FIT) -> Path | None:
        """A file of the energy fit of a task's final model (:meth:`stage_energy_file`),
        latest stage first."""
        for d in self.latest_stage_dirs(task):
            found = self.stage_energy_file(d, name)
            if found is not None:
                return found
        return None

    def metrics_logs(self) -> list[Path]:
        """Every stage's ``metrics.jsonl``."""
        return sorted(self.root.glob(f"t*_*/{METRICS_FILE}"))

    @property
    def summary_file(self) -> Path:
        return self.root / SUMMARY

    def write_summary(self, summary: dict) -> Path:
        return atomic_write_json(self.summary_file, summary)

    def load_summary(self) -> dict:
        """``summary.json`` with its tasks in task order."""
        path = self.summary_file
        if not path.is_file():
            raise OreError(f"run summary not found: {path} (written by `ore run-tasks`)")
        data = read_json(path)
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise OreError(f"{path}: expected {{'t1': {{'train': …, 'ft': …}}, …}}")
        return dict(sorted(data.items(), key=lambda kv: task_number(kv[0])))


_STAGE_DIR = re.compile(r"t(\d+)_(train|ft)")


@dataclass(frozen=True)
class RunStage:
    """What a detector needs from one stage folder of a run: its saved config, its final
    weights and, when the stage's model was fitted, its energy fit."""

    folder: Path
    config: Path
    weights: Path
    energy_fit: Path | None


def _stage_order(folder: Path) -> tuple[int, int]:
    m = _STAGE_DIR.fullmatch(folder.name)
    return int(m.group(1)), FOLDER_STAGES.index(m.group(2))


def find_run_stage(run: str | Path, stage: str | None = None) -> RunStage:
    """The stage of ``run`` to detect with.

    ``run`` is an ``ore train`` output folder (``config.yaml`` + ``model_final.pth``) or an
    ``ore run-tasks`` folder; there ``stage`` (``t2_ft``) names a stage folder, and without
    it the last finished one is taken (highest task, its finetune before its training).
    An :class:`OreError` names the folder and what it lacks.
    """
    root = Path(run)
    if not root.is_dir():
        raise OreError(f"--run {run}: not a folder")
    if stage is not None:
        if not _STAGE_DIR.fullmatch(stage):
            raise OreError(f"--stage {stage!r}: expected a stage folder name such as t2_ft "
                           "or t1_train")
        folder = root / stage
        if not folder.is_dir():
            found = sorted(p.name for p in root.iterdir() if _STAGE_DIR.fullmatch(p.name))
            raise OreError(f"--stage {stage}: no folder {folder} (stages there: "
                           f"{', '.join(found) or 'none'})")
    elif (root / FINAL).is_file() or (root / CONFIG).is_file():
        folder = root
    else:
        finished = [p for p in root.iterdir()
                    if _STAGE_DIR.fullmatch(p.name) and (p / FINAL).is_file()]
        if not finished:
            raise OreError(f"--run {run}: no {FINAL} there nor in a stage folder (t1_train, "
                           "t1_ft, …): not a finished ore train or ore run-tasks run")
        folder = max(finished, key=_stage_order)
    for name in (CONFIG, FINAL):
        if not (folder / name).is_file():
            raise OreError(f"--run {run}: {folder / name} not found (the stage is not finished)")
    return RunStage(folder, folder / CONFIG, folder / FINAL,
                    RunLayout.stage_energy_file(folder))


def stage_config(stage: RunStage, overrides: list[str] = ()):
    """The config a detector of ``stage`` runs with: its saved config, EBUI on with the
    stage's energy fit when it has one and the head is ORE's, then ``overrides`` (they
    come last and win)."""
    cfg = load_config(stage.config, list(overrides))
    if stage.energy_fit is not None and cfg.MODEL.ROI_HEADS.NAME == "ore":
        ebui = ["EBUI.ENABLED=true", f"EBUI.FIT_FILE={stage.energy_fit}"]
        cfg = load_config(stage.config, [*ebui, *overrides])
    return cfg
