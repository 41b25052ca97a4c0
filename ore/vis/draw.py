"""Drawing detections on images: one colour per class, ``unknown`` always in magenta."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from ore.data.classes import UNKNOWN

UNKNOWN_COLOR = (255, 0, 255)  # RGB magenta: never used for a known class


def class_color(name: str) -> tuple[int, int, int]:
    """A stable RGB colour per class name (golden-ratio hues, avoiding magenta)."""
    if name == UNKNOWN:
        return UNKNOWN_COLOR
    h = (sum(ord(c) * 31**i for i, c in enumerate(name)) * 0.618033988749895) % 1.0
    if 0.75 < h < 0.92:  # the magenta band is reserved for unknowns
        h = (h + 0.3) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image_rgb: np.ndarray, boxes: np.ndarray, names: list[str], scores: np.ndarray | None = None,
    thickness: int | None = None, energies: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``image_rgb`` with labelled boxes (0-based xyxy pixel coordinates); each
    label reads the class, then the score and the energy ``E`` when given."""
    out = np.ascontiguousarray(image_rgb).copy()
    h, w = out.shape[:2]
    thickness = thickness or max(1, round(min(h, w) / 250))
    scale = max(0.3, min(h, w) / 700)
    order = np.argsort(scores) if scores is not None else np.arange(len(names))
    for i in order:  # highest score drawn last, on top
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        color = class_color(names[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        label = names[i] if scores is None else f"{names[i]} {scores[i]:.2f}"
        if energies is not None:
            label += f" E{energies[i]:.1f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + 2
        cv2.rectangle(out, (x1, ty - th - 1), (x1 + tw + 2, ty + base - 1), color, -1)
        cv2.putText(out, label, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out
