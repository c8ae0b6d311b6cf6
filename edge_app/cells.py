"""Cutting a detected cell out of a camera field at the scale the model was trained at.

A model's contract says how much of its input a nucleated cell spans (``cell_fraction``). A
cell of diameter ``d`` pixels in the field is therefore cut as a square of side
``d / cell_fraction`` centred on it, so that it reaches the model at the trained scale whatever
the objective, camera or sensor resolution. Where that square leaves the field, the border is
replicated (a cell at the edge of the field still reaches the model at the right scale).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from bmc.contract import Contract


@dataclasses.dataclass(frozen=True)
class Box:
    """A cell's bounding box in pixels of the original frame."""

    x: int
    y: int
    w: int
    h: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    @property
    def diameter(self) -> float:
        return float(max(self.w, self.h))


def crop_cell(frame: np.ndarray, box: Box, contract: Contract) -> np.ndarray:
    """The square around ``box`` in which the cell spans ``contract.cell_fraction`` of the side."""
    side = max(8, int(round(box.diameter / contract.cell_fraction)))
    cx, cy = box.centre
    left = int(round(cx - side / 2))
    top = int(round(cy - side / 2))
    h, w = frame.shape[:2]
    pad_l, pad_t = max(0, -left), max(0, -top)
    pad_r, pad_b = max(0, left + side - w), max(0, top + side - h)
    crop = frame[max(0, top):min(h, top + side), max(0, left):min(w, left + side)]
    if pad_l or pad_t or pad_r or pad_b:
        crop = cv2.copyMakeBorder(crop, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REFLECT_101)
    return crop
