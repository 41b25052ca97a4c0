"""Open-world evaluation (SPEC §5): known mAP, U-Recall, WI, A-OSE, UDR/UDP, COCO AP.

- :class:`OpenWorldEvaluator` — the ``reset()`` / ``process()`` / ``evaluate()`` evaluator.
- :func:`read_detections` — a detections JSON file into arrays for ``add_detections``.
- :func:`format_table` — a result as a plain-text table.
- :mod:`ore.evaluation.metrics` — the vectorised metric functions;
  :mod:`ore.evaluation.naive` — a per-detection oracle for tests and benchmarks.

Names are imported on first use so that ``ore --help`` does not pay for numpy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "OpenWorldEvaluator": "ore.evaluation.evaluator",
    "RESULT_KEYS": "ore.evaluation.evaluator",
    "read_detections": "ore.evaluation.detections",
    "parse_detections": "ore.evaluation.detections",
    "format_table": "ore.evaluation.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ore.evaluation' has no attribute {name!r}")
