"""EBUI benchmarks: Weibull fit time, and EBUI off / on (labelled) / on (pseudo) per task.

    python tools/bench_energy.py                       # fit time for 100k samples
    python tools/bench_energy.py --runs runs/cmp/ore   # + toy-world metrics per task

``--runs`` takes an ``ore run-tasks`` output folder; for each task the final model
(``tN_ft`` when it exists, else ``tN_train``) is fitted in both modes on ``--fit-split``
and evaluated on the config's ``DATASETS.TEST`` with EBUI off and on. Fits go to
``--work`` (never into the run folder). Prints one table and writes ``--output`` JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

from ore.config import load_config
from ore.engine.energy_fit import fit_energy
from ore.engine.evaluate import evaluate_model
from ore.engine.inference import Predictor
from ore.engine.layout import CONFIG, ENERGY_FIT, RunLayout
from ore.modeling.weibull import fit_weibull3


def bench_fit(n: int, repeats: int) -> dict:
    x = stats.weibull_min.rvs(2.2, loc=-3.0, scale=2.5, size=n, random_state=0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit, _ = fit_weibull3(x)
        times.append(time.perf_counter() - t0)
    return {"n": n, "median_s": float(np.median(times)), "min_s": float(min(times)),
            "shape": fit.shape, "loc": fit.loc, "scale": fit.scale}


def bench_tasks(runs: Path, work: Path, fit_split: str, max_images: int) -> dict:
    layout = RunLayout(runs)
    out: dict = {}
    t = 1
    while (final := layout.find_weights(t)) is not None:
        stage = final.parent
        weights = str(final)
        base = ["DATALOADER.NUM_WORKERS=0"]
        cfg = load_config(stage / CONFIG, base)
        row = {"stage": stage.name}
        for mode in (None, "labelled", "pseudo"):
            over = base
            if mode:
                fit_dir = work / f"t{t}" / mode
                t0 = time.perf_counter()
                fit = fit_energy(cfg, weights, fit_dir, split_name=fit_split, mode=mode,
                                 max_images=max_images)
                row[f"fit_{mode}"] = {"counts": fit.counts, "seconds": time.perf_counter() - t0}
                over = [*base, "EBUI.ENABLED=true", f"EBUI.FIT_FILE={fit_dir / ENERGY_FIT}"]
            ecfg = load_config(stage / CONFIG, over)
            res, _ = evaluate_model(Predictor(ecfg, weights), ecfg.DATASETS.TEST, coco=False,
                                    details=False)
            row[mode or "off"] = {"unknown_recall": res["unknown_recall"],
                                  "wi_0.8": res["wilderness_impact"]["0.8"],
                                  "a_ose": res["a_ose"], "known_mAP_both": res["known_mAP_both"]}
        out[f"t{t}"] = row
        t += 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", type=Path, help="an `ore run-tasks` output folder")
    p.add_argument("--work", type=Path, default=Path("runs/bench-energy"))
    p.add_argument("--fit-split", default="all_task_val")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--output", type=Path)
    args = p.parse_args()

    result = {"fit": bench_fit(args.n, args.repeats)}
    f = result["fit"]
    print(f"3-parameter Weibull fit of {f['n']} samples: median {f['median_s']:.3f} s "
          f"(min {f['min_s']:.3f} s); shape {f['shape']:.3f} loc {f['loc']:.3f} "
          f"scale {f['scale']:.3f} (true 2.2, -3, 2.5)")
    if args.runs:
        result["tasks"] = bench_tasks(args.runs, args.work, args.fit_split, args.max_images)
        print(f"{'task':<6}{'EBUI':<10}{'U-Recall':>10}{'WI@0.8':>10}{'A-OSE':>8}{'mAP':>8}")
        for task, row in result["tasks"].items():
            for mode in ("off", "labelled", "pseudo"):
                r = row[mode]
                wi = "-" if r["wi_0.8"] is None else f"{r['wi_0.8']:.4f}"
                m = "-" if r["known_mAP_both"] is None else f"{r['known_mAP_both']:.2f}"
                print(f"{task:<6}{mode:<10}{r['unknown_recall']:>10.2f}{wi:>10}"
                      f"{r['a_ose']:>8}{m:>8}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
