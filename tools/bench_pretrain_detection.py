"""Backbone pretraining for the detector: task 1 of the toy world trained from scratch and
from each pretrained backbone for the same detection iterations, per seed.

    python tools/bench_pretrain_detection.py --world runs/toy-data --seeds 0 1 2 \\
        --methods simclr,dense,dense-fpn --pretrain-minutes 4 --eval-every 50

Pretraining runs on the images of the world's ``t1_train`` list (``ore pretrain --list``),
capped at ``--pretrain-minutes``, seeded with the detection seed. The methods:

* ``simclr``: image-level SimCLR on the tiny trunk (96 px, batch 64), the trunk exported;
* ``dense``: the dense loss on the toy detector's own trunk + pyramid (128 px, batch 32;
  ``ore pretrain --method dense``), the trunk exported;
* ``dense-fpn``: the same, trunk and pyramid exported; the detector starts from a
  checkpoint holding both (``MODEL.WEIGHTS``), its heads freshly initialised.

``--pretrain-extra METHOD=FLAGS`` adds ``ore pretrain`` flags to one method's recipe.
Detection is ``toy/t1_train.yaml`` with the ORE head at its defaults (``--iters`` scales
the schedule: steps and warm-up in proportion), ``DATALOADER.NUM_WORKERS=0``;
``--pretrained-overrides`` are config overrides for the pretrained starts only (batch
norm: ``MODEL.BACKBONE.NORM=FrozenBN`` keeps the pretrained statistics; learning rate:
``SOLVER.BASE_LR=…``, ``SOLVER.WARMUP_ITERS=…``; ``MODEL.BACKBONE.TRAINABLE_LAYERS=…``).
A checkpoint every ``--eval-every`` iterations is evaluated on ``DATASETS.TEST``: the
table gives the final known AP50 and U-Recall (mean ± std over seeds) and the first
evaluated iteration at which each run reaches its seed's from-scratch final AP50.

Every run goes to ``<out>/<method>/seed<N>/`` and every finished step (pretraining,
training, each evaluation) is kept, so an interrupted benchmark resumes where it stopped.
Writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/ap50_curves.png``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

from ore.cli.pretrain import add_arguments, options
from ore.config import load_config
from ore.data.classes import load_task_split
from ore.engine.checkpoint import build_model, read_trunk_weights, save_torch_file
from ore.engine.evaluate import evaluate_model
from ore.engine.inference import Predictor
from ore.engine.pretrain import pretrain
from ore.engine.runtime import seed_everything
from ore.engine.trainer import Trainer
from ore.errors import OreError
from ore.fileio import atomic_write, atomic_write_json, atomic_write_text, read_json
from ore.modeling.backbone import load_trunk_state
from ore.modeling.backbone_weights import load_fpn_state, split_backbone_state
from ore.modeling.detector import checkpoint_meta

CONFIG = "toy/t1_train.yaml"
METHODS = ("simclr", "dense", "dense-fpn")


def recipes(world: Path, cfg) -> dict[str, list[str]]:
    """``ore pretrain`` flags of each method (without seed, time and output)."""
    bb = cfg.MODEL.BACKBONE
    pyramid = ["--arch", bb.NAME, "--returned-stages", ",".join(map(str, bb.RETURNED_STAGES)),
               "--fpn-channels", str(bb.FPN_CHANNELS)]
    common = ["--list", f"{world}:{cfg.DATASETS.TRAIN}", "--epochs", "100000", "--no-progress"]
    dense = ["--method", "dense", *pyramid, "--image-size", "128", "--batch-size", "32"]
    return {
        "simclr": [*common, "--method", "simclr", "--arch", "tiny", "--image-size", "96",
                   "--batch-size", "64"],
        "dense": [*common, *dense, "--export", "trunk"],
        "dense-fpn": [*common, *dense, "--export", "backbone"],
    }


def pretrain_once(flags: list[str], out: Path, seed: int, minutes: float) -> tuple[Path, dict]:
    """The pretrained weights file (trained unless already there) and its last record."""
    weights = out / "weights.pth"
    done = out / "pretrain.json"
    if weights.is_file() and done.is_file():
        return weights, read_json(done)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = options(p.parse_args([*flags, "--seed", str(seed), "--minutes", str(minutes),
                                 "--output", str(weights)]))
    record = pretrain(args)
    atomic_write_json(done, {"flags": flags, "record": record})
    return weights, read_json(done)


def start_checkpoint(cfg, weights: Path, out: Path) -> Path:
    """A detector checkpoint holding the pretrained trunk and pyramid of ``weights`` and
    fresh heads (initialised as a run with ``cfg.SEED`` initialises them)."""
    path = out / "start.pth"
    if path.is_file():
        return path
    split = load_task_split(cfg.DATASETS.CLASSES)
    seed_everything(cfg.SEED, cfg.DETERMINISTIC)
    model = build_model(cfg, split)
    trunk, fpn = split_backbone_state(read_trunk_weights(weights), str(weights))
    if fpn is None:
        raise OreError(f"{weights}: holds no feature-pyramid weights")
    load_trunk_state(model.backbone.body, trunk, str(weights))
    load_fpn_state(model.backbone.fpn, fpn, str(weights))
    save_torch_file({"model": model.state_dict(), "meta": checkpoint_meta(cfg, split)}, path)
    return path


def schedule(cfg, iters: int | None, eval_every: int) -> list[str]:
    """Overrides for ``iters`` detection iterations (steps and warm-up scaled from the
    config's) and a kept checkpoint every ``eval_every`` iterations."""
    s = cfg.SOLVER
    total = iters or s.MAX_ITER
    out = [f"SOLVER.CHECKPOINT_PERIOD={eval_every}",
           f"SOLVER.KEEP_CHECKPOINTS={total // eval_every + 1}"]
    if iters and iters != s.MAX_ITER:
        scale = iters / s.MAX_ITER
        steps = sorted({max(1, min(iters - 1, round(v * scale))) for v in s.STEPS})
        out += [f"SOLVER.MAX_ITER={iters}", f"SOLVER.STEPS=[{','.join(map(str, steps))}]",
                f"SOLVER.WARMUP_ITERS={round(s.WARMUP_ITERS * scale)}"]
    return out


def _checkpoints(train_dir: Path, final: Path, total: int) -> list[tuple[int, Path]]:
    found = []
    for p in train_dir.glob("model_*.pth"):
        m = re.fullmatch(r"model_(\d+)\.pth", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found) + [(total, final)]


def run_one(world: Path, out: Path, method: str, seed: int, args, base_cfg) -> dict:
    """Pretrain (unless scratch), train, evaluate every kept checkpoint; cached."""
    result_file = out / "result.json"
    if result_file.is_file():
        return read_json(result_file)
    t0 = time.perf_counter()
    overrides = [f"DATASETS.ROOT={world}", f"SEED={seed}", "DATALOADER.NUM_WORKERS=0",
                 "MODEL.ROI_HEADS.NAME=ore", *schedule(base_cfg, args.iters, args.eval_every)]
    pre: dict = {}
    if method != "scratch":
        flags = recipes(world, base_cfg)[method] + shlex.split(args.pretrain_extra.get(method, ""))
        weights, pre = pretrain_once(flags, out / "pretrain", seed, args.pretrain_minutes)
        overrides += args.pretrained_overrides
        if method == "dense-fpn":
            start = start_checkpoint(load_config(CONFIG, overrides), weights, out)
            overrides.append(f"MODEL.WEIGHTS={start}")
        else:
            overrides.append(f"MODEL.BACKBONE.WEIGHTS={weights}")
    cfg = load_config(CONFIG, overrides)
    final = Trainer(cfg, out / "t1_train", resume=True).run()
    evals_file = out / "evals.json"
    evals = read_json(evals_file) if evals_file.is_file() else {}
    curve = []
    for it, ckpt in _checkpoints(out / "t1_train", final, cfg.SOLVER.MAX_ITER):
        if str(it) not in evals:
            metrics, _ = evaluate_model(Predictor(cfg, str(ckpt)), cfg.DATASETS.TEST,
                                        coco=False, details=False)
            evals[str(it)] = {"ap50": metrics.get("known_mAP_both"),
                              "u_recall": metrics.get("unknown_recall")}
            atomic_write_json(evals_file, evals)
        curve.append({"iter": it, **evals[str(it)]})
    result = {"method": method, "seed": seed, "curve": curve, "final": curve[-1],
              "pretrain": pre, "overrides": overrides,
              "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(result_file, result)
    return result


def iterations_to_reach(curve: list[dict], target: float | None) -> int | None:
    """The first evaluated iteration whose AP50 is at least ``target``."""
    if target is None:
        return None
    return next((c["iter"] for c in curve if c["ap50"] is not None and c["ap50"] >= target),
                None)


def _cell(values: list, digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict[str, dict[int, dict]]) -> tuple[str, dict]:
    """Markdown and the per-method summary: final AP50 and U-Recall (mean ± std over
    seeds) and iterations to reach the same seed's from-scratch final AP50."""
    scratch = results.get("scratch", {})
    lines = ["| start | known AP50 | U-Recall | iterations to scratch's final AP50 | "
             "pretraining steps | seeds |", "|---|---|---|---|---|---|"]
    summary = {}
    for name, by_seed in results.items():
        reach = []
        for seed, r in by_seed.items():
            target = scratch.get(seed, {}).get("final", {}).get("ap50")
            reach.append(iterations_to_reach(r["curve"], target))
        ap = [r["final"]["ap50"] for r in by_seed.values()]
        ur = [r["final"]["u_recall"] for r in by_seed.values()]
        steps = [r["pretrain"].get("record", {}).get("steps") for r in by_seed.values()]
        reach_text = ", ".join("never" if v is None else str(v) for v in reach)
        summary[name] = {"ap50": ap, "u_recall": ur, "iterations_to_scratch": reach,
                         "pretrain_steps": steps}
        lines.append(f"| {name} | {_cell(ap)} | {_cell(ur)} | {reach_text} | "
                     f"{_cell(steps, 0) if name != 'scratch' else '–'} | {len(by_seed)} |")
    return "\n".join(lines) + "\n", summary


def plot(results: dict[str, dict[int, dict]], path: Path, title: str) -> None:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for i, (name, by_seed) in enumerate(results.items()):
        color = f"C{i}"
        curves = [r["curve"] for r in by_seed.values()]
        for c in curves:  # each seed thin, the mean over seeds bold
            ax.plot([p["iter"] for p in c], [p["ap50"] for p in c], color=color, alpha=0.3,
                    lw=0.8)
        iters = [p["iter"] for p in curves[0]]
        if all([p["iter"] for p in c] == iters for c in curves):
            mean = [statistics.fmean(c[j]["ap50"] or 0.0 for c in curves)
                    for j in range(len(iters))]
            ax.plot(iters, mean, color=color, lw=2, label=f"{name} ({len(curves)} seeds)")
    ax.set_xlabel("detection iteration")
    ax.set_ylabel("known AP50")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _method_flags(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or name not in METHODS:
        raise argparse.ArgumentTypeError(f"--pretrain-extra {text!r}: expected METHOD=FLAGS "
                                         f"with METHOD one of {METHODS}")
    return name, flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=Path, required=True, help="a toy world (ore make-toy-data)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {METHODS}; scratch always runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-minutes", type=float, default=4.0)
    p.add_argument("--iters", type=int, default=None,
                   help="detection iterations (default: the config's 400)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="evaluate a checkpoint every N detection iterations")
    p.add_argument("--pretrain-extra", type=_method_flags, action="append", default=[],
                   metavar="METHOD=FLAGS", help="more `ore pretrain` flags for one method")
    p.add_argument("--pretrained-overrides", default="", metavar="KEY=VALUE,…",
                   help="config overrides for the pretrained starts only (e.g. "
                        "MODEL.BACKBONE.NORM=FrozenBN,SOLVER.WARMUP_ITERS=100)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-pretrain-detection"))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; expected some of {METHODS}")
    if args.eval_every < 1 or (args.iters is not None and args.iters < 1):
        p.error("--eval-every and --iters must be ≥ 1")
    args.methods = methods
    args.pretrain_extra = dict(args.pretrain_extra)
    args.pretrained_overrides = [o for o in args.pretrained_overrides.split(",") if o]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_cfg = load_config(CONFIG, [f"DATASETS.ROOT={args.world}"])
    results: dict[str, dict[int, dict]] = {}
    for name in ["scratch", *args.methods]:
        for seed in args.seeds:
            r = run_one(args.world, args.out / name / f"seed{seed}", name, seed, args, base_cfg)
            results.setdefault(name, {})[seed] = r
            print(f"{name} seed {seed}: AP50 {r['final']['ap50']}, U-Recall "
                  f"{r['final']['u_recall']} ({r['seconds']} s)", flush=True)
    text, summary = table(results)
    command = " ".join(sys.argv if argv is None else ["tools/bench_pretrain_detection.py", *argv])
    print(text)
    iters = args.iters or base_cfg.SOLVER.MAX_ITER
    plot(results, args.out / "ap50_curves.png",
         f"toy T1, ORE head, {iters} iterations; pretraining {args.pretrain_minutes} min")
    atomic_write_json(args.out / "results.json",
                      {"command": command, "summary": summary, "results": results})
    atomic_write_text(args.out / "results.md", f"`{command}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
