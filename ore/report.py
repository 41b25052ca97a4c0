"""The demo report: ORE against the closed-set baseline over every task of a run.

Reads two folders written by ``ore run-tasks`` (ORE and the standard Faster R-CNN on the
same schedule) and writes, into one output folder:

- ``report.html``: one self-contained page (styles inline, images as ``data:`` URIs);
- ``report.md`` and the ``report_*.png`` files it shows, next to it;
- ``metrics.json``: ``{"ore": summary, "baseline": summary, "final_stage": …, "targets": …}``.

A run's ``summary.json`` maps ``"tN"`` to ``{stage: metrics | None}``; the figures that
stand for a task are those of its last stage (:func:`final_stage`). Every file is written
atomically (:mod:`ore.fileio`), so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ore.data.classes import TOY_NEVER_INTRODUCED, TOY_TASKS, UNKNOWN
from ore.errors import OreError
from ore.fileio import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# A task's stages in the order they run; the last one present gives the task's figures.
STAGES = ("train", "ft", "ebui")
# The targets on the toy world.
U_RECALL_MIN = 20.0  # percent
KNOWN_MAP_RATIO_MIN = 0.9  # ORE's known mAP (both) over the baseline's
DRAW_SCORE_THRESH = 0.3  # detections drawn on the sample images (readability)

ORE_COLOR, BASELINE_COLOR = "#1f6feb", "#8c8c8c"


@dataclass(frozen=True)
class Metric:
    """One column of the results table: a key of the evaluator's result (``wi`` → WI@0.8)."""

    key: str
    label: str
    higher_is_better: bool
    digits: int


METRICS = (
    Metric("known_mAP_prev", "Known mAP (previously known)", True, 1),
    Metric("known_mAP_current", "Known mAP (current)", True, 1),
    Metric("known_mAP_both", "Known mAP (both)", True, 1),
    Metric("unknown_recall", "U-Recall", True, 1),
    Metric("wi", "WI@0.8", False, 4),
    Metric("a_ose", "A-OSE", False, 0),
    Metric("udr", "UDR", True, 1),
    Metric("udp", "UDP", True, 1),
)


# --- reading runs -------------------------------------------------------------------------

def final_stage(stages: dict | None) -> str | None:
    """The stage whose figures stand for a task: the last of :data:`STAGES` with results.

    ``"ebui"`` when present, else ``"ft"``, else ``"train"``; ``None`` when no stage has
    figures. Stages with another name are ignored.
    """
    for stage in reversed(STAGES):
        if (stages or {}).get(stage) is not None:
            return stage
    return None


def final_metrics(stages: dict | None) -> dict | None:
    stage = final_stage(stages)
    return None if stage is None else stages[stage]


def metric_value(metrics: dict | None, key: str):
    """A figure of one evaluation result (``None`` when undefined or missing)."""
    if metrics is None:
        return None
    if key == "wi":
        return (metrics.get("wilderness_impact") or {}).get("0.8")
    return metrics.get(key)


def _task_number(name: str) -> int:
    m = re.fullmatch(r"t(\d+)", name)
    if not m:
        raise OreError(f"summary.json: key {name!r} is not a task (expected t1, t2, …)")
    return int(m.group(1))


def load_summary(run_dir: str | Path) -> dict:
    """``<run_dir>/summary.json`` with its tasks in task order."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise OreError(f"run summary not found: {path} (written by `ore run-tasks`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OreError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise OreError(f"{path}: expected {{'t1': {{'train': …, 'ft': …}}, …}}")
    return dict(sorted(data.items(), key=lambda kv: _task_number(kv[0])))


def read_losses(path: Path) -> list[dict]:
    """Rows of a trainer's ``metrics.jsonl`` that have ``iter`` and ``loss`` (others skipped)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(row, dict) and "iter" in row and "loss" in row:
            rows.append(row)
    return rows


# --- targets ------------------------------------------------------------------------------

def _target(value, passed, **extra) -> dict:
    return {"value": value, "pass": passed, **extra}


def evaluate_targets(ore: dict, baseline: dict) -> dict:
    """The issue's four toy-world targets, per task, on the final figures of each run.

    Per task: ``u_recall`` (ORE's U-Recall ≥ 20), ``known_map_ratio`` (ORE's known mAP
    (both) / the baseline's ≥ 0.9), ``prev_known_after_ft`` (t ≥ 2: ORE's previously-known
    mAP after the finetune minus before it, > 0), ``wi`` and ``a_ose`` (ORE's below the
    baseline's). Each is ``{"value", "pass", …}``; ``pass`` is ``None`` when the target
    does not apply or a figure is missing (e.g. no unknown object in the test set), and
    ``"all_pass"`` is true when every target that applies passes.
    """
    out: dict = {}
    verdicts = []
    for task, stages in ore.items():
        t = _task_number(task)
        o, b = final_metrics(stages), final_metrics(baseline.get(task))
        row = {}
        ur = metric_value(o, "unknown_recall")
        row["u_recall"] = _target(ur, None if ur is None else ur >= U_RECALL_MIN,
                                  threshold=U_RECALL_MIN)
        mo, mb = metric_value(o, "known_mAP_both"), metric_value(b, "known_mAP_both")
        ratio = mo / mb if mo is not None and mb else None
        row["known_map_ratio"] = _target(
            ratio, None if ratio is None else ratio >= KNOWN_MAP_RATIO_MIN,
            threshold=KNOWN_MAP_RATIO_MIN, ore=mo, baseline=mb)
        if t >= 2:
            before = metric_value(stages.get("train"), "known_mAP_prev")
            after = metric_value(stages.get("ft"), "known_mAP_prev")
            delta = after - before if before is not None and after is not None else None
            row["prev_known_after_ft"] = _target(
                delta, None if delta is None else delta > 0, before=before, after=after)
        for key in ("wi", "a_ose"):
            vo, vb = metric_value(o, key), metric_value(b, key)
            passed = None if vo is None or vb is None else vo < vb
            row[key] = _target(vo, passed, baseline=vb)
        verdicts += [r["pass"] for r in row.values()]
        out[task] = row
    applicable = [v for v in verdicts if v is not None]
    out["all_pass"] = bool(applicable) and all(applicable)
    return out


TARGET_LABELS = {
    "u_recall": "U-Recall ≥ 20",
    "known_map_ratio": "Known mAP (both) ≥ 90% of baseline",
    "prev_known_after_ft": "Previously-known mAP up after finetune",
    "wi": "WI@0.8 below baseline",
    "a_ose": "A-OSE below baseline",
}


# --- formatting ---------------------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if digits == 0:
        return f"{int(round(value)):,}"
    return f"{value:.{digits}f}"


def _better(a, b, higher_is_better: bool) -> int:
    """+1 when ``a`` is better, −1 when ``b`` is, 0 on a tie or a missing figure."""
    if a is None or b is None or a == b:
        return 0
    return 1 if (a > b) == higher_is_better else -1


def _target_value_text(name: str, tgt: dict) -> str:
    v = tgt["value"]
    if name == "u_recall":
        return f"{_fmt(v)}"
    if name == "known_map_ratio":
        return (f"{_fmt(None if v is None else 100 * v)}% "
                f"({_fmt(tgt['ore'])} vs {_fmt(tgt['baseline'])})")
    if name == "prev_known_after_ft":
        sign = "" if v is None or v < 0 else "+"
        return f"{_fmt(tgt['before'])} → {_fmt(tgt['after'])} ({sign}{_fmt(v)})"
    digits = 4 if name == "wi" else 0
    return f"{_fmt(v, digits)} vs {_fmt(tgt['baseline'], digits)}"


def _verdict(passed) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[passed]


# --- figures ------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_metrics_over_tasks(ore: dict, baseline: dict) -> bytes:
    """One small panel per metric: ORE and the baseline against the task number."""
    from matplotlib.figure import Figure

    tasks = list(ore)
    x = [_task_number(t) for t in tasks]
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
    from matplotlib.figure import Figure

    curves = {}
    for label, run_dir in runs.items():
        for task in tasks:
            train = read_losses(run_dir / f"{task}_train" / "metrics.jsonl")
            ft = read_losses(run_dir / f"{task}_ft" / "metrics.jsonl")
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


def _stage_dirs(run_dir: Path, task: str) -> list[Path]:
    """A task's stage folders, latest first (``tN_ft``, then ``tN_train``)."""
    return [run_dir / f"{task}_{stage}" for stage in ("ft", "train")]


def find_energy_fit(run_dir: Path, task: str, name: str = "energy_fit.json") -> Path | None:
    """A file of the energy fit of a task's final model: ``<stage>/energy/<name>`` (as
    ``ore run-tasks`` writes it) or ``<stage>/<name>``, latest stage first."""
    for d in _stage_dirs(run_dir, task):
        for p in (d / "energy" / name, d / name):
            if p.is_file():
                return p
    return None


def find_energy_plot(run_dir: Path, task: str) -> Path | None:
    return find_energy_fit(run_dir, task, "energy.png")


def find_weights(run_dir: Path, task: str) -> Path | None:
    for d in _stage_dirs(run_dir, task):
        if (d / "model_final.pth").is_file():
            return d / "model_final.pth"
    return None


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
    import cv2
    import numpy as np

    from ore.vis import draw_detections

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
    import cv2
    import numpy as np

    from ore.config import load_config
    from ore.data.records import apply_role, load_split
    from ore.engine.inference import Predictor

    summary = load_summary(ore_run)
    summary_tasks = list(summary)
    last = _task_number(summary_tasks[-1])
    weights = weights or find_weights(ore_run, summary_tasks[-1])
    if weights is None:
        raise OreError(f"{ore_run}/{summary_tasks[-1]}_*/model_final.pth: no final weights")
    overrides = [f"DATASETS.ROOT={toy_root}", f"OWOD.TASK={last}"]
    fit = find_energy_fit(ore_run, summary_tasks[-1])
    if fit is not None and final_stage(summary[summary_tasks[-1]]) == "ebui":
        # Draw what the final figures measured: the model with its energy-based identifier.
        overrides += ["EBUI.ENABLED=true", f"EBUI.FIT_FILE={fit}"]
    cfg = load_config(ore_config, overrides)
    predictor = Predictor(cfg, str(weights), score_thresh=DRAW_SCORE_THRESH)
    d = cfg.DATASETS
    records = apply_role(load_split(d.ROOT, d.TEST, predictor.split, d.FORMAT, d.IMAGE_DIR),
                         predictor.split, last, "test")
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


# --- documents ----------------------------------------------------------------------------

INTRO = (
    "The toy open world is a small synthetic dataset in the M-OWODB layout: textured, "
    "cluttered images holding coloured shapes. Four tasks each teach five shape classes "
    "({tasks}); three shapes ({never}) are never taught. At task <i>t</i> every class not "
    "yet taught is <b>unknown</b>, and unknown shapes appear unlabelled in training images, "
    "as in the real benchmark. ORE (the open-world detector) is compared with a standard "
    "closed-set Faster R-CNN trained on the same schedule; the baseline has no "
    "<i>unknown</i> class, so by construction its U-Recall is 0 and every unknown object "
    "it detects is a mistake."
)
DEFINITIONS = (
    ("Known mAP", "AP50 averaged over previously known, current, or both sets of seen "
                  "classes (higher is better)."),
    ("U-Recall", "share of unknown objects detected and labelled <i>unknown</i> "
                 "(IoU &gt; 0.5; higher is better)."),
    ("WI@0.8", "Wilderness Impact: how much unknown objects pollute the known-class "
               "detections at 80% recall (lower is better)."),
    ("A-OSE", "absolute open-set error: known-class detections lying on an unknown object "
              "(lower is better)."),
    ("UDR / UDP", "unknown detection recall (unknowns localised, whatever the label) and "
                  "precision (of those, the share labelled unknown)."),
)

CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,
sans-serif;color:#1f2328;background:#fff;margin:0;line-height:1.5}
main{max-width:1180px;margin:0 auto;padding:28px 32px 60px}
h1{font-size:28px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 10px;padding-bottom:6px;
border-bottom:1px solid #d0d7de}.sub{color:#59636e;margin:0 0 18px}
p,li{font-size:15px;max-width:880px}dl{display:grid;grid-template-columns:110px 1fr;
gap:2px 12px;font-size:14px;max-width:880px}dt{font-weight:600}dd{margin:0}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
th,td{padding:5px 12px;border-bottom:1px solid #e6e8eb}
th{background:#f6f8fa;font-weight:600;text-align:center}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{text-align:left;white-space:nowrap}th.name{text-align:left}
td.best{background:#dafbe1;font-weight:600}
th.group{border-left:2px solid #d0d7de}td.group{border-left:2px solid #d0d7de}
.pass{color:#1a7f37;font-weight:700}.FAIL{color:#cf222e;font-weight:700}
.n\\/a{color:#8c959f}.note{color:#59636e;font-size:13px}
img{max-width:100%;height:auto}.figure{margin:8px 0 4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:18px}
.grid figure,.energy figure{margin:0}figcaption{font-size:13px;color:#59636e}
.energy{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:18px}
.none{border:1px dashed #d0d7de;border-radius:6px;padding:18px;color:#8c959f;
font-size:14px;align-self:start}
.key{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:-1px;
margin:0 4px 0 10px}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class _Doc:
    """Builds the HTML and the Markdown of the report side by side."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []
        self.files: dict[str, bytes] = {}

    def heading(self, text: str, level: int = 2):
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"{'#' * level} {text}\n")

    def para(self, html_text: str, md_text: str | None = None, cls: str = ""):
        attr = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{attr}>{html_text}</p>")
        plain = md_text if md_text is not None else re.sub(r"<[^>]+>", "", html_text)
        self.md.append(html.unescape(plain) + "\n")

    def image(self, name: str, png: bytes, alt: str, caption: str = "", wrap: bool = True):
        self.files[name] = png
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        tag = f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}">'
        if wrap:
            self.html.append(f'<figure class="figure">{tag}{cap}</figure>')
        self.md.append(f"![{alt}]({name})\n" + (f"\n*{caption}*\n" if caption else ""))
        return f"<figure>{tag}{cap}</figure>"

    def table(self, header: list[tuple[str, str]], rows: list[list[tuple[str, str]]],
              md_header: list[str] | None = None):
        """Cells are ``(text, css class)``; a class ``num`` right-aligns the cell."""
        head = "".join(f'<th class="{c}">{html.escape(t)}</th>' for t, c in header)
        body = "".join(
            "<tr>" + "".join(f'<td class="{c}">{t}</td>' for t, c in row) + "</tr>"
            for row in rows
        )
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        names = md_header or [t for t, _ in header]
        align = ["---:" if "num" in (rows[0][i][1] if rows else "") else ":---"
                 for i in range(len(names))]
        lines = ["| " + " | ".join(names) + " |", "|" + "|".join(align) + "|"]
        for row in rows:
            cells = []
            for text, c in row:
                plain = html.unescape(re.sub(r"<[^>]+>", "", text))
                cells.append(f"**{plain}**" if "best" in c and plain != "–" else plain)
            lines.append("| " + " | ".join(cells) + " |")
        self.md.append("\n".join(lines) + "\n")


def _results_table(doc: _Doc, ore: dict, baseline: dict) -> None:
    tasks = list(ore)
    header = [("Metric", "name")]
    for t in tasks:
        header += [(f"{t.upper()} ORE", "group"), (f"{t.upper()} baseline", "")]
    rows = []
    for m in METRICS:
        row = [(html.escape(m.label + (" ↑" if m.higher_is_better else " ↓")), "name")]
        for t in tasks:
            vo = metric_value(final_metrics(ore.get(t)), m.key)
            vb = metric_value(final_metrics(baseline.get(t)), m.key)
            better = _better(vo, vb, m.higher_is_better)
            row.append((_fmt(vo, m.digits), "num group" + (" best" if better > 0 else "")))
            row.append((_fmt(vb, m.digits), "num" + (" best" if better < 0 else "")))
        rows.append(row)
    doc.table(header, rows)


def _finetune_table(doc: _Doc, ore: dict, baseline: dict) -> bool:
    rows = []
    for t in ore:
        if _task_number(t) < 2:
            continue
        row = [(t.upper(), "name")]
        for run in (ore, baseline):
            st = run.get(t) or {}
            before = metric_value(st.get("train"), "known_mAP_prev")
            after = metric_value(st.get("ft"), "known_mAP_prev")
            delta = after - before if before is not None and after is not None else None
            row += [(_fmt(before), "num group"), (_fmt(after), "num"),
                    (("+" if delta is not None and delta >= 0 else "") + _fmt(delta),
                     "num" + (" best" if delta is not None and delta > 0 else ""))]
        rows.append(row)
    if not rows:
        return False
    header = [("Task", "name"), ("ORE before", "group"), ("ORE after", ""), ("ORE Δ", ""),
              ("baseline before", "group"), ("baseline after", ""), ("baseline Δ", "")]
    doc.table(header, rows)
    return True


def _targets_table(doc: _Doc, targets: dict) -> None:
    rows = []
    for task, row in targets.items():
        if task == "all_pass":
            continue
        for name, tgt in row.items():
            verdict = _verdict(tgt["pass"])
            rows.append([(task.upper(), "name"), (html.escape(TARGET_LABELS[name]), "name"),
                         (html.escape(_target_value_text(name, tgt)), "num"),
                         (f'<span class="{verdict}">{verdict}</span>', "name")])
    doc.table([("Task", "name"), ("Target", "name"), ("Measured (ORE vs baseline)", ""),
               ("Result", "name")], rows)


def write_report(out_dir: str | Path, *, ore_run: str | Path, baseline_run: str | Path,
                 toy_root: str | Path | None = None, ore_config=None, samples: int = 8,
                 weights: str | Path | None = None, title: str = "ORE on the toy open world",
                 ) -> dict:
    """Write ``report.html``, ``report.md`` (+ its PNGs) and ``metrics.json`` to ``out_dir``.

    Args:
        out_dir: folder for the report (created; files in it are replaced atomically).
        ore_run, baseline_run: folders written by ``ore run-tasks`` for ORE and the
            closed-set baseline (``summary.json``, ``tN_train/``, ``tN_ft/``).
        toy_root: the dataset root whose ``DATASETS.TEST`` list gives the sample images.
        ore_config: ORE's config file (or name under ``detection_configs/``); with
            ``toy_root`` it enables the grid of sample detections. ``None`` skips the grid.
        samples: number of sample images in the grid (0 skips it).
        weights: ORE checkpoint for the grid (default: the last task's latest
            ``model_final.pth`` in ``ore_run``).
        title: the report's heading.

    Returns:
        ``{"html": path, "md": path, "metrics": path, "images": [paths],
        "targets": the targets dict of metrics.json}``.
    """
    out = Path(out_dir)
    ore_run, baseline_run = Path(ore_run), Path(baseline_run)
    ore, baseline = load_summary(ore_run), load_summary(baseline_run)
    if not ore:
        raise OreError(f"{ore_run}/summary.json has no task")
    if samples < 0:
        raise OreError(f"samples={samples} must be ≥ 0")
    targets = evaluate_targets(ore, baseline)
    tasks = list(ore)

    doc = _Doc()
    doc.html.append(f"<h1>{html.escape(title)}</h1>")
    doc.md.append(f"# {title}\n")
    stages = ", ".join(f"{t.upper()}: {final_stage(s) or '–'}" for t, s in ore.items())
    doc.para(f"ORE run <code>{html.escape(str(ore_run))}</code> · baseline run "
             f"<code>{html.escape(str(baseline_run))}</code> · figures of each task's last "
             f"stage ({html.escape(stages)})", cls="sub")

    doc.heading("What you are looking at")
    intro = INTRO.format(tasks="; ".join(", ".join(t) for t in TOY_TASKS),
                         never=", ".join(TOY_NEVER_INTRODUCED))
    doc.para(intro)
    doc.html.append("<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in DEFINITIONS)
                    + "</dl>")
    doc.md.append("\n".join(f"- **{k}**: {html.unescape(re.sub(r'<[^>]+>', '', v))}"
                            for k, v in DEFINITIONS) + "\n")

    doc.heading("Targets")
    n_pass = sum(1 for t, r in targets.items() if t != "all_pass"
                 for v in r.values() if v["pass"] is True)
    n_all = sum(1 for t, r in targets.items() if t != "all_pass"
                for v in r.values() if v["pass"] is not None)
    doc.para(f"<b>{n_pass} of {n_all}</b> applicable targets met"
             + (" — all pass." if targets["all_pass"] else "; failures in red below."))
    _targets_table(doc, targets)

    doc.heading("Results per task")
    doc.para("Each task's final figures (AP, recall in %; WI a fraction; A-OSE a count). "
             "The better of ORE and the baseline is highlighted; ↑ higher is better, "
             "↓ lower is better.")
    _results_table(doc, ore, baseline)

    doc.heading("Previously known classes: before and after the exemplar finetune")
    if _finetune_table(doc, ore, baseline):
        doc.para("Known mAP of the classes of earlier tasks, right after training task t and "
                 "after the finetune on a balanced exemplar set, which counters forgetting.",
                 cls="note")
    else:
        doc.para("Only one task: there are no previously known classes.", cls="note")

    doc.heading("Metrics over tasks")
    doc.image("report_metrics.png", plot_metrics_over_tasks(ore, baseline),
              "metrics over tasks", "ORE (blue) and the baseline (grey, dashed), per task.")

    doc.heading("Training loss")
    losses = plot_losses({"ORE": ore_run, "baseline": baseline_run}, tasks)
    if losses is None:
        doc.para("No training log (<code>metrics.jsonl</code>) in the run folders.", cls="note")
    else:
        doc.image("report_losses.png", losses, "training loss",
                  "Total loss per iteration; dotted: the exemplar finetune.")

    doc.heading("Energy of known and unknown detections")
    doc.para("The energy-based unknown identifier fits one Weibull distribution to the energy "
             "of known and one to that of unknown detections; a detection is called unknown "
             "where the unknown fit is the more likely.", cls="note")
    figures = []
    for t in tasks:
        p = find_energy_plot(ore_run, t)
        if p is None:
            figures.append(f'<figure class="none">{t.upper()}: no energy fit</figure>')
            doc.md.append(f"*{t.upper()}: no energy fit*\n")
        else:
            figures.append(doc.image(f"report_energy_{t}.png", p.read_bytes(),
                                     f"energy {t}", f"{t.upper()}", wrap=False))
    doc.html.append('<div class="energy">' + "".join(figures) + "</div>")

    if ore_config is not None and toy_root is not None and samples > 0:
        doc.heading("Detections on test images")
        doc.para(f"Left: the ground truth as the last task sees it (classes not yet taught "
                 f"are <i>unknown</i>). Right: ORE's detections with score ≥ "
                 f"{DRAW_SCORE_THRESH}. Unknowns are drawn in "
                 f'<span class="key" style="background:#ff00ff"></span>magenta.')
        cells = []
        for i, (image_id, png) in enumerate(
                render_samples(ore_run, Path(toy_root), ore_config, samples,
                               Path(weights) if weights else None), start=1):
            cells.append(doc.image(f"report_sample_{i:02d}.png", png, f"sample {image_id}",
                                   f"image {image_id}", wrap=False))
        doc.html.append('<div class="grid">' + "".join(cells) + "</div>")

    out.mkdir(parents=True, exist_ok=True)
    images = [atomic_write(out / name, lambda f, b=png: f.write(b))
              for name, png in doc.files.items()]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>\n"
            + "\n".join(doc.html) + "\n</main></body></html>\n")
    html_path = atomic_write_text(out / "report.html", page)
    md_path = atomic_write_text(out / "report.md", "\n".join(doc.md))
    final = {"ore": {t: final_stage(s) for t, s in ore.items()},
             "baseline": {t: final_stage(s) for t, s in baseline.items()}}
    metrics_path = atomic_write_json(out / "metrics.json", {
        "ore": ore, "baseline": baseline, "final_stage": final, "targets": targets})
    log.info("report written to %s", html_path)
    return {"html": html_path, "md": md_path, "metrics": metrics_path, "images": images,
            "targets": targets}
