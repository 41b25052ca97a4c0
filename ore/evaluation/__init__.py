"""Open-world evaluation (SPEC §5) from boxes and labels alone: known mAP, U-Recall, WI,
A-OSE, UDR/UDP, COCO AP.

- :class:`OpenWorldEvaluator`: the ``reset()`` / ``process()`` / ``evaluate()`` evaluator.
- :func:`read_detections`: a detections JSON file into arrays for ``add_detections``.
- :func:`format_table`: a result as a plain-text table.
- :mod:`ore.evaluation.metrics`: the vectorised metric functions.
"""

from __future__ import annotations

from ore.evaluation.detections import parse_detections, read_detections
from ore.evaluation.evaluator import RESULT_KEYS, OpenWorldEvaluator
from ore.evaluation.report import format_table

__all__ = ["RESULT_KEYS", "OpenWorldEvaluator", "format_table", "parse_detections",
           "read_detections"]
