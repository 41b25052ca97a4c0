"""The incremental schedule of ``ore run-tasks``: task by task, resumable.

For each task t (configs ``tN_train.yaml`` and optional ``tN_ft.yaml`` in one folder):
train (from task t−1's final weights, prototypes included), build the balanced exemplar
list and finetune on it, then evaluate on ``DATASETS.TEST`` before and after the
finetune. With the ORE head (and ``EBUI.RUN_TASKS``), the energy of the task's final model
is fitted on ``EBUI.FIT_SPLIT`` and the model evaluated again with EBUI on (the summary's
``ebui`` entry). Every step writes into the run folder (:mod:`ore.engine.layout`); a step
whose result exists is skipped and an interrupted training resumes from its last
checkpoint. A stage folder counts as that stage only while the config it saved equals the
one the stage would run now: any other difference is an error, checked for every stage
before the first one runs. The run folder is locked while a schedule runs in it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ore.config import CONFIG_ROOT, config_differences, load_config
from ore.data.classes import load_task_split
from ore.data.exemplars import build_exemplar_list
from ore.engine.energy_fit import fit_energy
from ore.engine.evaluate import evaluate_model
from ore.engine.inference import Predictor
from ore.engine.layout import (
    CONFIG,
    ENERGY_FIT,
    FINAL,
    REPORTED,
    STAGES,
    RunLayout,
    final_stage,
    task_key,
)
from ore.engine.trainer import Trainer
from ore.errors import OreError
from ore.evaluation.evaluator import RESULT_KEYS, protocol_name
from ore.fileio import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    folder_lock,
    read_json,
    read_yaml,
)

log = logging.getLogger(__name__)

_TASK_FILE = re.compile(r"^t(\d+)_(train|ft)\.yaml$")


def find_config_dir(name: str | Path) -> Path:
    """A folder of task configs: as given, or one shipped with the package (``toy``)."""
    config_dir = Path(name)
    if not config_dir.is_dir() and (CONFIG_ROOT / name).is_dir():
        return CONFIG_ROOT / name
    return config_dir


def discover_tasks(config_dir: Path) -> list[tuple[int, Path, Path | None]]:
    """``[(t, tN_train.yaml, tN_ft.yaml or None), …]`` in task order."""
    if not config_dir.is_dir():
        raise OreError(f"config folder not found: {config_dir}")
    found: dict[int, dict[str, Path]] = {}
    for p in config_dir.iterdir():
        m = _TASK_FILE.match(p.name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = p
    if not found:
        raise OreError(f"{config_dir} has no task configs (t1_train.yaml, t2_train.yaml, …)")
    tasks = []
    for t in sorted(found):
        if "train" not in found[t]:
            raise OreError(f"{config_dir}: t{t}_ft.yaml has no t{t}_train.yaml")
        tasks.append((t, found[t]["train"], found[t].get("ft")))
    if [t for t, _, _ in tasks] != list(range(1, len(tasks) + 1)):
        raise OreError(f"{config_dir}: tasks must be numbered 1..N without gaps")
    return tasks


def _evaluate(cfg: DictConfig, weights: Path, out_file: Path) -> dict:
    """The stage's evaluation, reused when ``out_file`` holds one made under the protocol
    asked for (every listed line, or each image once), made again otherwise."""
    protocol = protocol_name(cfg.DATASETS.TEST_UNIQUE_IMAGES)
    if out_file.is_file():
        saved = read_json(out_file)
        if isinstance(saved, dict) and saved.get("protocol") == protocol:
            return saved
        log.info("%s: made under protocol %s, evaluating again under %s", out_file,
                 saved.get("protocol", "unnamed") if isinstance(saved, dict) else "unnamed",
                 protocol)
    result, _ = evaluate_model(Predictor(cfg, str(weights)), cfg.DATASETS.TEST, details=False)
    result = {k: result[k] for k in RESULT_KEYS}
    atomic_write_json(out_file, result)
    return result


def _fit_and_evaluate_ebui(config_file: Path, overrides: list[str], stage_dir: Path,
                           weights: Path, evaluate: bool) -> dict | None:
    """Fit the energy of a task's final model (its stage's energy folder) and, with
    ``evaluate``, evaluate it with EBUI on."""
    fit_file = RunLayout.energy_dir(stage_dir) / ENERGY_FIT
    if not fit_file.is_file():
        fit_energy(load_config(config_file, overrides), str(weights), fit_file.parent)
    if not evaluate:
        return None
    cfg = load_config(config_file, [*overrides, "EBUI.ENABLED=true", f"EBUI.FIT_FILE={fit_file}"])
    return _evaluate(cfg, weights, RunLayout.ebui_eval_file(stage_dir))


def scaled_iterations(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def schedule_overrides(cfg: DictConfig, scale: float) -> list[str]:
    """Overrides that multiply every iteration count of ``cfg`` by ``scale``."""
    if scale == 1.0:
        return []
    s, c = cfg.SOLVER, cfg.CLUSTERING
    steps = [scaled_iterations(x, scale) for x in s.STEPS]
    start = round(s.START_ITER * scale)
    return [
        f"SOLVER.START_ITER={start}",
        f"SOLVER.MAX_ITER={max(start + 1, scaled_iterations(s.MAX_ITER, scale))}",
        f"SOLVER.STEPS={steps}",
        f"SOLVER.WARMUP_ITERS={round(s.WARMUP_ITERS * scale)}",
        f"SOLVER.CHECKPOINT_PERIOD={scaled_iterations(s.CHECKPOINT_PERIOD, scale)}",
        f"CLUSTERING.START_ITER={round(c.START_ITER * scale)}",
        f"CLUSTERING.UPDATE_MU_ITER={scaled_iterations(c.UPDATE_MU_ITER, scale)}",
    ]


def planned_iterations(config_dir: Path, overrides: list[str] = (), scale: float = 1.0
                       ) -> int:
    """Training iterations of one run over every task config (as :func:`run_tasks` scales)."""
    total = 0
    for _, train, ft in discover_tasks(config_dir):
        for f in (train, ft):
            if f is not None:
                ovs = [*overrides, *schedule_overrides(load_config(f, overrides), scale)]
                s = load_config(f, ovs).SOLVER
                total += s.MAX_ITER - s.START_ITER
    return total


# Keys that say how a stage runs, not what it computes: they may change between reruns.
RUN_ONLY_KEYS = ("DATALOADER.NUM_WORKERS", "DEVICE", "OUTPUT_DIR",
                 # how the test list is counted, not what is trained
                 "DATASETS.TEST_UNIQUE_IMAGES")


@dataclass
class _Stage:
    """One training of the schedule: its config file, overrides, config and folder, and
    for a finetune on a built exemplar list, the config that list is drawn with."""

    file: Path
    overrides: list[str]
    cfg: DictConfig
    folder: Path
    exemplars_cfg: DictConfig | None = None


def plan_stage(file: Path, task: int, folder: Path, overrides: list[str], *,
               scale: float = 1.0, exemplar_list: Path | None = None) -> _Stage:
    """One stage of task ``task``: ``file`` with ``overrides`` (and its schedule scaled by
    ``scale``), trained in ``folder``. With ``exemplar_list``, a finetune whose config builds
    its exemplars (``EXEMPLARS.BUILD``) trains on that list, written before it runs."""
    ovs = list(overrides)
    ovs += schedule_overrides(load_config(file, ovs), scale)
    cfg = load_config(file, ovs)
    if cfg.OWOD.TASK != task:
        raise OreError(f"{file}: OWOD.TASK is {cfg.OWOD.TASK}, expected {task}")
    stage = _Stage(file, ovs, cfg, folder)
    if exemplar_list is not None and cfg.EXEMPLARS.BUILD:
        # The chosen images are kept next to the finetuned checkpoint.
        stage.exemplars_cfg = cfg
        stage.overrides = [*ovs, f"DATASETS.TRAIN={exemplar_list}"]
        stage.cfg = load_config(file, stage.overrides)
    return stage


def _plan(config_dir: Path, run: RunLayout, overrides: list[str], scale: float
          ) -> list[tuple[int, _Stage, _Stage | None]]:
    """Every task's training and finetune stages, as run_tasks runs them."""
    plan = []
    prev: Path | None = None
    for t, train_file, ft_file in discover_tasks(config_dir):
        train = plan_stage(train_file, t, run.stage_dir(t, "train"),
                           [*overrides, *([f"MODEL.WEIGHTS={prev}"] if prev else [])],
                           scale=scale)
        ft = None
        if ft_file is not None:
            ft = plan_stage(ft_file, t, run.stage_dir(t, "ft"),
                            [*overrides, f"MODEL.WEIGHTS={train.folder / FINAL}"],
                            scale=scale, exemplar_list=run.exemplar_list(t))
        plan.append((t, train, ft))
        prev = (ft or train).folder / FINAL
    return plan


def _check_unchanged(stage: _Stage) -> None:
    """A stage folder that holds a config must hold this stage's: a rerun with another
    config would report the old results as the new ones."""
    saved_file = stage.folder / CONFIG
    if not saved_file.is_file():
        return
    saved = read_yaml(saved_file)
    if not isinstance(saved, dict):
        raise OreError(f"{saved_file}: expected the config a run saved (a mapping)")
    differ = {k: v for k, v in config_differences(saved, stage.cfg).items()
              if k not in RUN_ONLY_KEYS}
    if differ:
        shown = "; ".join(f"{k} {then!r} there, {now!r} now"
                          for k, (then, now) in list(differ.items())[:3])
        more = f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise OreError(f"{stage.folder} holds a run of another config ({shown}{more}); "
                       "choose another --output for this one")


def run_tasks(config_dir: str | Path, output: str | Path, overrides: list[str] = (),
              evaluate: bool = True, schedule_scale: float = 1.0) -> dict:
    """Run every task; returns ``{"t1": {"train": metrics, "ft": metrics|None,
    "ebui": metrics|None, "reported": stage}, …}``; ``ebui`` is the task's final model
    (finetuned when there is a finetune) with the energy-based unknown identifier on, and
    ``reported`` the stage whose figures stand for the task (``EBUI.REPORTED``). ``schedule_scale``
    multiplies every iteration count (a quick run: 0.1; more data: > 1)."""
    if not (math.isfinite(schedule_scale) and schedule_scale > 0):
        raise OreError(f"--schedule-scale {schedule_scale}: expected a finite number > 0")
    run = RunLayout(check_output_dir(output))
    plan = _plan(Path(config_dir), run, list(overrides), schedule_scale)
    with folder_lock(run.root):
        summary = run_stages(run, plan, evaluate)
        run.write_summary(summary)
    return summary


def run_stages(run: RunLayout, plan: list[tuple[int, _Stage, _Stage | None]],
               evaluate: bool = True) -> dict:
    """Run planned tasks in ``run`` (each stage checked first: a folder holding another
    config's run is an error); returns their summary entries by task key."""
    for _, train, ft in plan:
        for stage in (train, ft):
            if stage is not None:
                _check_unchanged(stage)
    return {task_key(t): _run_task(t, train, ft, run, evaluate) for t, train, ft in plan}


def write_task_summary(run: RunLayout, key: str, entry: dict) -> dict:
    """The run's ``summary.json`` with task ``key``'s entry set (added or replaced)."""
    summary = run.load_summary() if run.summary_file.is_file() else {}
    summary[key] = entry
    run.write_summary(summary)
    return summary


def _unknowns_remain(cfg: DictConfig, task: int) -> bool:
    """Whether the class split leaves any class unknown after ``task`` (later tasks or
    never-introduced classes); without one, there is no unknown energy to fit."""
    split = load_task_split(cfg.DATASETS.CLASSES)
    if task < split.num_tasks or split.never_introduced:
        return True
    log.warning("task %d leaves no class of split %s unknown: EBUI is not fitted", task,
                split.name)
    return False


def _run_task(t: int, train: _Stage, ft: _Stage | None, run: RunLayout, evaluate: bool
              ) -> dict:
    """Train, finetune, fit the energy and evaluate task ``t``; returns its summary entry."""
    cfg = train.cfg
    final = Trainer(cfg, train.folder, resume=True).run()
    stages = {"train": None, "ft": None, "ebui": None}
    if evaluate:
        stages["train"] = _evaluate(cfg, final, run.eval_file(t, "train"))
    last = train
    if ft is not None:
        list_file = run.exemplar_list(t)
        if ft.exemplars_cfg is not None and not list_file.is_file():
            ids = build_exemplar_list(ft.exemplars_cfg)
            atomic_write_text(list_file, "".join(i + "\n" for i in ids))
        final = Trainer(ft.cfg, ft.folder, resume=True).run()
        if evaluate:
            stages["ft"] = _evaluate(ft.cfg, final, run.eval_file(t, "ft"))
        last = ft
    if cfg.EBUI.RUN_TASKS and cfg.MODEL.ROI_HEADS.NAME == "ore" and _unknowns_remain(cfg, t):
        # EBUI on the task's final model: fit on the held-out split, then evaluate with it.
        stages["ebui"] = _fit_and_evaluate_ebui(last.file, last.overrides, last.folder, final,
                                                evaluate)
    if evaluate:
        shown = stages if cfg.EBUI.REPORTED else {**stages, "ebui": None}
        stages[REPORTED] = final_stage(shown)
    return stages


def format_summary(summary: dict) -> str:
    def f(x, digits=2):
        return "-" if x is None else (str(x) if isinstance(x, int) else f"{x:.{digits}f}")

    header = (f"{'task':<10}{'prev mAP':>10}{'cur mAP':>10}{'both mAP':>10}{'U-Recall':>10}"
              f"{'WI@0.8':>9}{'A-OSE':>8}")
    lines = [header, "-" * len(header)]
    for task, stages in summary.items():
        for stage in STAGES:
            r = stages.get(stage)
            if r is None:
                continue
            lines.append(
                f"{task + ' ' + stage:<10}{f(r['known_mAP_prev']):>10}"
                f"{f(r['known_mAP_current']):>10}{f(r['known_mAP_both']):>10}"
                f"{f(r['unknown_recall']):>10}{f(r['wilderness_impact']['0.8'], 4):>9}"
                f"{f(r['a_ose']):>8}"
            )
    return "\n".join(lines)
