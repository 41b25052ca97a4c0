"""Ablations on the toy world: each variant (config overrides) trained and evaluated per
seed, in one table with the mean and spread over seeds.

    python tools/ablate_toy.py --world runs/toy-data --seeds 0 1 2 \\
        --variant base= --variant lr0.08=SOLVER.BASE_LR=0.08,SOLVER.CLIP_GRAD_NORM=10

``--tasks 1`` (default) trains task 1 only (``toy/t1_train.yaml``) and evaluates it on
``DATASETS.TEST``; ``--tasks all`` runs the whole schedule (``ore run-tasks`` on the toy
configs) and reports each task's final stage. ``--head standard`` ablates the closed-set
baseline, ``--head ore`` (default) the ORE head. Every run goes to
``<out>/<variant>/seed<N>/`` and is skipped when its results exist, so an interrupted
sweep resumes. Writes ``<out>/ablation.json`` and ``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from ore.config import CONFIG_ROOT, load_config
from ore.engine.evaluate import evaluate_model
from ore.engine.inference import Predictor
from ore.engine.layout import final_metrics
from ore.engine.tasks import run_tasks
from ore.engine.trainer import Trainer
from ore.fileio import atomic_write_json, atomic_write_text, read_json

FIGURES = (("known_mAP_both", "known mAP", 1), ("known_mAP_prev", "prev mAP", 1),
           ("unknown_recall", "U-Recall", 1), ("wi", "WI@0.8", 3), ("a_ose", "A-OSE", 0))


def _figure(metrics: dict | None, key: str):
    if metrics is None:
        return None
    return (metrics.get("wilderness_impact") or {}).get("0.8") if key == "wi" else metrics.get(key)


def run_one(world: Path, out: Path, overrides: list[str], seed: int, tasks: str) -> dict:
    """``{"t1": metrics, …}`` of one variant and seed (read back when already run)."""
    result_file = out / "result.json"
    if result_file.is_file():
        return read_json(result_file)
    common = [f"DATASETS.ROOT={world}", f"SEED={seed}", "DATALOADER.NUM_WORKERS=0", *overrides]
    t0 = time.perf_counter()
    if tasks == "1":
        cfg = load_config("toy/t1_train.yaml", common)
        final = Trainer(cfg, out / "t1_train", resume=True).run()
        metrics, _ = evaluate_model(Predictor(cfg, str(final)), cfg.DATASETS.TEST, coco=False,
                                    details=False)
        result = {"t1": metrics}
    else:
        summary = run_tasks(CONFIG_ROOT / "toy", out, common)
        result = {t: final_metrics(stages) for t, stages in summary.items()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(result_file, result)
    return result


def _cell(values: list, digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict[str, dict[int, dict]]) -> str:
    """Markdown: one row per variant and task, mean ± sample std over seeds."""
    header = ["variant", "task", *[label for _, label, _ in FIGURES], "seconds", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_seed in results.items():
        runs = list(by_seed.values())
        tasks = [k for k in runs[0] if k.startswith("t")]
        for task in tasks:
            cells = [_cell([_figure(r.get(task), key) for r in runs], digits)
                     for key, _, digits in FIGURES]
            lines.append("| " + " | ".join([name, task.upper(), *cells,
                                            _cell([r["seconds"] for r in runs], 0),
                                            str(len(runs))]) + " |")
    return "\n".join(lines) + "\n"


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=KEY=VALUE,…")
    return name, [o for o in overrides.split(",") if o]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=Path, required=True, help="a toy world (ore make-toy-data)")
    p.add_argument("--variant", type=_variant, action="append", required=True,
                   help="NAME=KEY=VALUE,KEY=VALUE (NAME= alone: the configs as shipped)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tasks", choices=("1", "all"), default="1")
    p.add_argument("--head", choices=("ore", "standard"), default="ore")
    p.add_argument("--out", type=Path, default=Path("runs/ablate-toy"))
    args = p.parse_args()
    results: dict[str, dict[int, dict]] = {}
    for name, overrides in args.variant:
        overrides = [f"MODEL.ROI_HEADS.NAME={args.head}", *overrides]
        for seed in args.seeds:
            r = run_one(args.world, args.out / name / f"seed{seed}", overrides, seed, args.tasks)
            results.setdefault(name, {})[seed] = r
            t1 = r.get("t1") or {}
            print(f"{name} seed {seed}: T1 known mAP {t1.get('known_mAP_both')}, "
                  f"U-Recall {t1.get('unknown_recall')} ({r['seconds']} s)", flush=True)
    text = table(results)
    print(text)
    atomic_write_json(args.out / "ablation.json",
                      {"command": " ".join(sys.argv), "results": results})
    atomic_write_text(args.out / "ablation.md", f"`{' '.join(sys.argv)}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
