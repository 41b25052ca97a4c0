"""Open-world evaluation (SPEC §5) from boxes and labels alone: known mAP, U-Recall, WI,
A-OSE, UDR/UDP, COCO AP.

- :class:`OpenWorldEvaluator`: the ``reset()`` / ``process()`` / ``evaluate()`` evaluator.
- :func:`read_detections`: a detections JSON file into arrays for ``add_detections``.
- :func:`format_table`: a result as a plain-text table (its last line names the protocol:
  ``listed-lines``, every line of the list as the published figures, or ``unique-images``).
- :mod:`ore.evaluation.metrics`: the vectorised metric functions.
"""

from __future__ import annotations

from ore.evaluation.detections import parse_detections, read_detections
from ore.evaluation.evaluator import PROTOCOLS, RESULT_KEYS, OpenWorldEvaluator
from ore.evaluation.report import format_table, protocol_line

__all__ = ["PROTOCOLS", "RESULT_KEYS", "OpenWorldEvaluator", "format_table", "parse_detections",
           "protocol_line", "read_detections"]
