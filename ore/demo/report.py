"""The demo report: ORE against the closed-set baseline over every task of a run.

Reads two folders written by ``ore run-tasks`` (ORE and the standard Faster R-CNN on the
same schedule) and writes, into one output folder:

- ``report.html``: one self-contained page (styles inline, images as ``data:`` URIs);
- ``report.md`` and the ``report_*.png`` files it shows, next to it;
- ``metrics.json``: ``{"ore": summary, "baseline": summary, "final_stage": …, "targets": …}``.

Every file is written atomically (:mod:`ore.fileio`), so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
from pathlib import Path

from ore.data.classes import TOY_NEVER_INTRODUCED, TOY_TASKS
from ore.demo.figures import (
    DRAW_SCORE_THRESH,
    gallery_excerpt,
    plot_losses,
    plot_metrics_over_tasks,
    render_samples,
)
from ore.demo.targets import METRICS, TARGET_LABELS, evaluate_targets, metric_value
from ore.engine.discover import SHEET_TILE
from ore.engine.layout import ENERGY_PLOT, RunLayout, final_metrics, final_stage, task_number
from ore.errors import OreError
from ore.evaluation.report import protocol_line
from ore.fileio import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


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
    if name == "prev_known_kept":
        return (f"{_fmt(tgt['before'])} → {_fmt(tgt['after'])} "
                f"({_fmt(None if v is None else 100 * v)}%)")
    digits = 4 if name == "wi" else 0
    return f"{_fmt(v, digits)} vs {_fmt(tgt['baseline'], digits)}"


def _verdict(passed) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[passed]


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


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


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
        mime = "image/jpeg" if name.endswith(".jpg") else "image/png"
        tag = f'<img src="{_data_uri(png, mime)}" alt="{html.escape(alt)}">'
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
        if task_number(t) < 2:
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


LOOP_TARGETS = {"purity": "cluster purity ≥ 85%",
                "coverage": "never-introduced objects in a cluster ≥ 60%",
                "new_ap50_ratio": "new classes' AP50, discovered / ground-truth labels ≥ 80%",
                "old_map_kept": "old classes' mAP after the new task ≥ 90% of before"}
GALLERY_ROWS = 8  # rows of the discover gallery shown in the report
LOOP_ROWS = {"ground_truth": "ground-truth boxes", "discovered": "discovered clusters"}


def _pct(v) -> str:
    """A fraction as a percentage, "–" when missing."""
    return "–" if v is None else f"{_fmt(100 * v)}%"


def _loop_section(doc: _Doc, loop: dict, gallery: Path | None) -> None:
    """The open-world loop (:mod:`ore.demo.loop`): discovery, then the new task learnt from
    the discovered clusters and from ground truth."""
    n, novel, d = loop["task"], loop["new_classes"], loop["discover"]
    doc.heading(f"From unknowns to new classes: task {n}")
    whose = ("the crops its gallery row shows" if loop.get("names_from") == "gallery"
             else "its members")
    doc.para(f"After task {n - 1}, <code>ore discover</code> ran the final model over the "
             f"training images of every task, clustered the detections labelled "
             f"<i>unknown</i> and named each cluster by the majority ground-truth class of "
             f"{whose} (<i>ignore</i> where the majority is no object or a known class), as "
             f"a person reviewing the gallery would. <code>ore add-task</code> then learnt "
             f"the named clusters as task {n}; the same task learnt from the ground-truth "
             f"boxes of {', '.join(novel)} in the same images is the reference. Purity and "
             f"coverage count every member of every cluster.")
    if "error" in d:
        doc.para(f"Discovery found nothing to cluster: {html.escape(d['error'])}", cls="note")
    else:
        majorities = {}
        for m in d["majorities"]:
            majorities[m] = majorities.get(m, 0) + 1
        mixed = ", ".join(f"{c}: {k}" for c, k in sorted(majorities.items()))
        cov = " · ".join(f"{c} {_pct(v)}" for c, v in d["coverage"].items())
        score = f"score ≥ {loop.get('score_thresh', '–')}" + (
            f", whole-object score ≥ {loop['objectness']}" if loop.get("objectness") else "")
        doc.para(f"{d['members']:,} unknown detections ({score}) in {d['k']} clusters; purity "
                 f"{_pct(d['purity'])}; never-introduced objects that land in a cluster: "
                 f"{_pct(d['coverage_all'])} ({html.escape(cov)}). Majorities of all "
                 f"members: {html.escape(mixed)}."
                 + ("" if "names" not in d else " Names given: " + html.escape(", ".join(
                     f"{c}: {k}" for c, k in d["names"].items())) + "."))
        if gallery is not None and gallery.is_file():
            named = [c for c, _ in d.get("named_clusters", [])]
            rows = named + [c for c in range(d["k"]) if c not in named]
            doc.image("report_discover_gallery.jpg",
                      gallery_excerpt(gallery.read_bytes(), rows[:GALLERY_ROWS], SHEET_TILE),
                      "clusters", f"The clusters named a new class, then the largest "
                      f"(at most {GALLERY_ROWS} rows; every cluster is in "
                      f"{d['folder']}/gallery.html), the most typical crops first.")
    rows = []
    for name, label in LOOP_ROWS.items():
        r = loop["tasks"].get(name, {})
        if "skipped" in r:
            rows.append([(label, "name"), (f"not learnt: {html.escape(r['skipped'])}", "name")]
                        + [("–", "num")] * (len(novel) + 2))
            continue
        rows.append([(label, "name"), ("learnt", "name")]
                    + [(_fmt(r["new_AP50"].get(c)), "num") for c in novel]
                    + [(_fmt(r["new_mAP50"]), "num"),
                       (f"{_fmt(loop['old_mAP_before'])} → {_fmt(r['old_mAP_after'])}", "num")])
    doc.table([("Labels", "name"), ("Task", "name")] + [(f"{c} AP50", "") for c in novel]
              + [("new mAP50", ""), (f"old classes' mAP (T{n - 1} → T{n})", "")], rows)
    rows = []
    for key, label in LOOP_TARGETS.items():
        tgt = loop["targets"][key]
        verdict = _verdict(tgt["pass"])
        rows.append([(html.escape(label), "name"), (_pct(tgt["value"]), "num"),
                     (f'<span class="{verdict}">{verdict}</span>', "name")])
    doc.table([("Loop target", "name"), ("Measured", ""), ("Result", "name")], rows)


def write_report(out_dir: str | Path, *, ore_run: str | Path, baseline_run: str | Path,
                 toy_root: str | Path | None = None, ore_config=None, samples: int = 8,
                 weights: str | Path | None = None, title: str = "ORE on the toy open world",
                 loop: dict | None = None) -> dict:
    """Write ``report.html``, ``report.md`` (+ its PNGs) and ``metrics.json`` to ``out_dir``.

    Args:
        out_dir: folder for the report (created; files in it are replaced atomically).
        ore_run, baseline_run: folders written by ``ore run-tasks`` for ORE and the
            closed-set baseline (``summary.json``, ``tN_train/``, ``tN_ft/``).
        toy_root: the dataset root whose ``DATASETS.TEST`` list gives the sample images.
        ore_config: ORE's config file (or a name shipped with ore, ``toy/t4_train.yaml``); with
            ``toy_root`` it enables the grid of sample detections. ``None`` skips the grid.
        samples: number of sample images in the grid (0 skips it).
        weights: ORE checkpoint for the grid (default: the last task's latest
            ``model_final.pth`` in ``ore_run``).
        title: the report's heading.
        loop: the open-world loop's figures (:func:`ore.demo.loop.run_loop`), shown with
            its gallery and kept in ``metrics.json`` under ``"loop"``; None leaves it out.

    Returns:
        ``{"html": path, "md": path, "metrics": path, "images": [paths],
        "targets": the targets dict of metrics.json}``.
    """
    out = Path(out_dir)
    ore_run, baseline_run = Path(ore_run), Path(baseline_run)
    ore_layout = RunLayout(ore_run)
    ore, baseline = ore_layout.load_summary(), RunLayout(baseline_run).load_summary()
    if not ore:
        raise OreError(f"{ore_layout.summary_file} has no task")
    if samples < 0:
        raise OreError(f"samples={samples} must be ≥ 0")
    targets = evaluate_targets(ore, baseline)
    tasks = list(ore)

    doc = _Doc()
    doc.html.append(f"<h1>{html.escape(title)}</h1>")
    doc.md.append(f"# {title}\n")
    stages = ", ".join(f"{t.upper()}: {final_stage(s) or '–'}" for t, s in ore.items())
    doc.para(f"ORE run <code>{html.escape(str(ore_run))}</code> · baseline run "
             f"<code>{html.escape(str(baseline_run))}</code> · figures of each task's reported "
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
    finals = [final_metrics(stages) for stages in ore.values()]
    first = next((r for r in finals if r), None)
    if first is not None:
        line = protocol_line(first)
        doc.para(html.escape(line), line)

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
             "where the unknown fit is the more likely. A task reported at its <i>ft</i> or "
             "<i>train</i> stage was evaluated with it as well (EBUI.REPORTED is off): "
             "its <i>ebui</i> figures are in metrics.json.", cls="note")
    figures = []
    for t in tasks:
        p = ore_layout.find_energy_file(task_number(t), ENERGY_PLOT)
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

    if loop is not None:
        gallery = loop["discover"].get("gallery")
        _loop_section(doc, loop, Path(gallery) if gallery else None)

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
        "ore": ore, "baseline": baseline, "final_stage": final, "targets": targets,
        **({"loop": loop} if loop is not None else {})})
    log.info("report written to %s", html_path)
    return {"html": html_path, "md": md_path, "metrics": metrics_path, "images": images,
            "targets": targets}
