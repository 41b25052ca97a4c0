"""The demo's figures: metrics over tasks, training losses, and sample detections.

Each returns PNG bytes; the report embeds them in its page and writes them beside it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure

from ore.config import load_config
from ore.data.classes import UNKNOWN
from ore.data.records import load_dataset_split
from ore.demo.targets import METRICS, metric_value
from ore.engine.inference import Predictor
from ore.engine.layout import FINAL, RunLayout, final_metrics, final_stage, task_number
from ore.engine.metrics_log import FILE as METRICS_FILE
from ore.engine.metrics_log import read_metrics
from ore.errors import OreError
from ore.vis.draw import draw_detections

ORE_COLOR, BASELINE_COLOR = "#1f6feb", "#8c8c8c"
DRAW_SCORE_THRESH = 0.3  # detections drawn on the sample images (readability)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_metrics_over_tasks(ore: dict, baseline: dict) -> bytes:
    """One small panel per metric: ORE and the baseline against the task number."""
    tasks = list(ore)
    x = [task_number(t) for t in tasks]
    fig = Figure(figsize=(13, 5.6))
    axes = fig.subplots(2, 4)
    for ax, m in zip(axes.flat, METRICS):
        for run, label, color, style in ((ore, "ORE", ORE_COLOR, "-"),
                                         (baseline, "baseline", BASELINE_COLOR, "--")):
            y = [metric_value(final_metrics(run.get(t)), m.key) for t in tasks]
            y = [math.nan if v is None else v for v in y]
            ax.plot(x, y, style, marker="o", color=color, label=label, linewidth=2)
        ax.set_title(m.label + (" ↑" if m.higher_is_better else " ↓"), fontsize=10)
        ax.set_xticks(x, [f"T{i}" for i in x])
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes.flat[0].legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_losses(runs: dict[str, Path], tasks: list[str]) -> bytes | None:
    """Total training loss per task (training then finetune), one line style per run."""
    curves = {}
    for label, run_dir in runs.items():
        layout = RunLayout(run_dir)
        for task in tasks:
            t = task_number(task)
            train = read_metrics(layout.stage_dir(t, "train") / METRICS_FILE, ("iter", "loss"))
            ft = read_metrics(layout.stage_dir(t, "ft") / METRICS_FILE, ("iter", "loss"))
            offset = train[-1]["iter"] if train else 0
            curves[label, task] = ([r["iter"] for r in train], [r["loss"] for r in train],
                                   [offset + r["iter"] for r in ft], [r["loss"] for r in ft])
    if not any(c[0] or c[2] for c in curves.values()):
        return None
    fig = Figure(figsize=(13, 3.0))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    colors = {"ORE": ORE_COLOR, "baseline": BASELINE_COLOR}
    for ax, task in zip(axes, tasks):
        for label in runs:
            xi, yi, xf, yf = curves[label, task]
            ax.plot(xi, yi, color=colors.get(label), label=f"{label} train", linewidth=1.5)
            if xf:
                ax.plot(xf, yf, ":", color=colors.get(label), label=f"{label} finetune",
                        linewidth=1.5)
        ax.set_title(task.upper(), fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("total loss", fontsize=9)
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def pick_samples(records, n: int) -> list:
    """``n`` test images, evenly spaced through the list, preferring images with unknowns.

    Deterministic: the order of the list, no random numbers.
    """
    with_unknown = [r for r in records if UNKNOWN in r.names]
    pool = with_unknown if len(with_unknown) >= n else records
    if n >= len(pool):
        return list(pool)
    return [pool[(i * len(pool)) // n] for i in range(n)]


def _panel(image_rgb, boxes, names, scores, title: str, scale: float):
    """One half of a sample: the image scaled up, boxes drawn, a title strip on top."""
    h, w = image_rgb.shape[:2]
    big = cv2.resize(image_rgb, (round(w * scale), round(h * scale)),
                     interpolation=cv2.INTER_CUBIC)
    drawn = draw_detections(big, np.asarray(boxes, np.float32).reshape(-1, 4) * scale, names,
                            scores)
    strip = np.full((26, drawn.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, title, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (40, 40, 40), 1,
                cv2.LINE_AA)
    return np.concatenate([strip, drawn])


def render_samples(ore_run: Path, toy_root: Path, ore_config, samples: int,
                   weights: Path | None = None) -> list[tuple[str, bytes]]:
    """``[(image id, PNG)]``: ground truth (test role) beside ORE's final-task detections."""
    run = RunLayout(ore_run)
    summary = run.load_summary()
    summary_tasks = list(summary)
    last = task_number(summary_tasks[-1])
    weights = weights or run.find_weights(last)
    if weights is None:
        raise OreError(f"{ore_run}/{summary_tasks[-1]}_*/{FINAL}: no final weights")
    overrides = [f"DATASETS.ROOT={toy_root}", f"OWOD.TASK={last}"]
    fit = run.find_energy_file(last)
    if fit is not None and final_stage(summary[summary_tasks[-1]]) == "ebui":
        # Draw what the final figures measured: the model with its energy-based identifier.
        overrides += ["EBUI.ENABLED=true", f"EBUI.FIT_FILE={fit}"]
    cfg = load_config(ore_config, overrides)
    predictor = Predictor(cfg, str(weights), score_thresh=DRAW_SCORE_THRESH)
    records = load_dataset_split(cfg.DATASETS, cfg.DATASETS.TEST, predictor.split, last, "test")
    out = []
    for rec in pick_samples(records, samples):
        bgr = cv2.imread(rec.file_name, cv2.IMREAD_COLOR)
        if bgr is None:
            raise OreError(f"cannot read image {rec.file_name}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        det = predictor.predict([rgb])[0]
        keep = det.scores >= DRAW_SCORE_THRESH
        scale = 320 / rgb.shape[0]  # every sample the same height, labels legible
        gt = _panel(rgb, rec.boxes - 1, rec.names, None, "ground truth", scale)  # VOC → 0-based
        pred = _panel(rgb, det.boxes[keep], [n for n, k in zip(det.names, keep) if k],
                      det.scores[keep], f"ORE after T{last} (score >= {DRAW_SCORE_THRESH})",
                      scale)
        gap = np.full((gt.shape[0], 10, 3), 255, np.uint8)
        pair = np.concatenate([gt, gap, pred], axis=1)
        ok, png = cv2.imencode(".png", cv2.cvtColor(pair, cv2.COLOR_RGB2BGR))
        out.append((rec.image_id, png.tobytes()))
    return out


def gallery_excerpt(sheet_png: bytes, rows: list[int], tile: int, pad: int = 4,
                    quality: int = 85) -> bytes:
    """JPEG of the given rows (0-based, in that order) of a discover contact sheet
    (``gallery.png``: rows ``tile`` pixels high, ``pad`` between and around them)."""
    sheet = cv2.imdecode(np.frombuffer(sheet_png, np.uint8), cv2.IMREAD_COLOR)
    if sheet is None:
        raise OreError("the gallery sheet is not a readable image")
    step = tile + pad
    n = (sheet.shape[0] - pad) // step
    parts = [sheet[pad + r * step - pad:pad + r * step + tile] for r in rows if 0 <= r < n]
    out = np.concatenate([*parts, sheet[:pad]]) if parts else sheet[:pad]
    ok, data = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OreError("cannot encode the gallery excerpt (OpenCV)")
    return data.tobytes()
