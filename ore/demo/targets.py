"""The toy-world targets: what ORE must show against the closed-set baseline, per task.

Works on two run summaries (``summary.json`` of ``ore run-tasks``); the figures that
stand for a task are those of its final stage (:func:`ore.engine.layout.final_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ore.engine.layout import final_metrics, task_number

U_RECALL_MIN = 50.0  # percent
KNOWN_MAP_RATIO_MIN = 0.95  # ORE's known mAP (both) over the baseline's
# ORE's previously-known mAP at task t over its known mAP (both) at task t − 1: what the
# classes of earlier tasks keep of their accuracy through task t.
PREV_KEPT_MIN = 0.85


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


def metric_value(metrics: dict | None, key: str):
    """A figure of one evaluation result (``None`` when undefined or missing)."""
    if metrics is None:
        return None
    if key == "wi":
        return (metrics.get("wilderness_impact") or {}).get("0.8")
    return metrics.get(key)


def _target(value, passed, **extra) -> dict:
    return {"value": value, "pass": passed, **extra}


def evaluate_targets(ore: dict, baseline: dict) -> dict:
    """The toy-world targets, per task, on the final figures of each run.

    Per task: ``u_recall`` (ORE's U-Recall ≥ 50), ``known_map_ratio`` (ORE's known mAP
    (both) / the baseline's ≥ 0.95), ``prev_known_kept`` (t ≥ 2: ORE's previously-known mAP
    at task t / its known mAP (both) at task t − 1 ≥ 0.85), ``wi`` and ``a_ose`` (ORE's
    below the baseline's). Each is ``{"value", "pass", …}``; ``pass`` is ``None`` when the target
    does not apply or a figure is missing (e.g. no unknown object in the test set), and
    ``"all_pass"`` is true when every target that applies passes.
    """
    out: dict = {}
    verdicts = []
    previous = None  # ORE's final figures of the task before
    for task, stages in ore.items():
        t = task_number(task)
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
            before = metric_value(previous, "known_mAP_both")
            after = metric_value(o, "known_mAP_prev")
            kept = after / before if before and after is not None else None
            row["prev_known_kept"] = _target(
                kept, None if kept is None else kept >= PREV_KEPT_MIN, threshold=PREV_KEPT_MIN,
                before=before, after=after)
        previous = o
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
    "u_recall": f"U-Recall ≥ {U_RECALL_MIN:g}",
    "known_map_ratio": f"Known mAP (both) ≥ {100 * KNOWN_MAP_RATIO_MIN:g}% of baseline",
    "prev_known_kept": f"Previously-known mAP ≥ {100 * PREV_KEPT_MIN:g}% of the task before",
    "wi": "WI@0.8 below baseline",
    "a_ose": "A-OSE below baseline",
}
