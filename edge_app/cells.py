"""Cutting a detected cell out of a camera field at the scale the model was trained at.

A model's contract says how much of its input a nucleated cell spans (``cell_fraction``). A
cell of diameter ``d`` pixels in the field is therefore cut as a square of side
``d / cell_fraction`` centred on it, so that it reaches the model at the trained scale whatever
the objective, camera or sensor resolution. Where that square leaves the field, the border is
replicated (a cell at the edge of the field still reaches the model at the right scale).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from bmc.contract import Contract, lamp_of, white_balance


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


@dataclasses.dataclass
class CellCall:
    """One cell of a frame as a session sees it: where it is, the model's call, and whether it counts.

    ``flag`` is empty for a counted cell, ``"seen"`` for a cell tracked from an earlier frame (not
    counted again), ``"tracking"`` for a moving cell not judged yet (:mod:`bmc.edge_app.tracker`),
    else why it waits for review (``unknown …``, low confidence). Only ``new`` cells are recorded;
    ``embedding`` is the model's pooled cell embedding, where it has one.
    """

    box: Box
    label: str
    confidence: float
    probabilities: np.ndarray
    flag: str = ""
    track: int | None = None
    new: bool = True
    embedding: np.ndarray | None = None
    frame: int | None = None  # the frame of the view recorded, where it is not the frame being recorded


def crop_cell(frame: np.ndarray, box: Box, contract: Contract) -> np.ndarray:
    """The square around ``box`` in which the cell spans ``contract.cell_fraction`` of the side."""
    side = max(8, int(round(box.diameter / contract.cell_fraction)))
    cx, cy = box.centre
    left = int(round(cx - side / 2))
    top = int(round(cy - side / 2))
    h, w = frame.shape[:2]
    pad_l, pad_t = max(0, -left), max(0, -top)
    pad_r, pad_b = max(0, left + side - w), max(0, top + side - h)
    crop = frame[max(0, top) : min(h, top + side), max(0, left) : min(w, left + side)]
    if pad_l or pad_t or pad_r or pad_b:
        fill = (
            [float(v) for v in np.median(crop.reshape(-1, crop.shape[2]), axis=0)]
            if crop.ndim == 3
            else float(np.median(crop))
        )
        crop = cv2.copyMakeBorder(crop, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_CONSTANT, value=fill)
    return crop


class CutDiameter:
    """The diameter, in frame pixels, that every cell of a session is cut at.

    Magnification is a property of the microscope and camera, not of each cell: cutting each
    cell by its own size would blow small lymphocytes up and shrink large monocytes, erasing the
    size differences the model learnt from. The session's scale is therefore one number — a fixed
    ``diameter_px`` from the device config, or the running median of the diameters of the cells
    found so far (robust to the odd clump or fragment).
    """

    def __init__(self, diameter_px: float | None = None, window: int = 501):
        self.fixed = diameter_px
        self.window = window
        self._seen: list[float] = []

    def observe(self, diameters: Iterable[float]) -> None:
        self._seen.extend(float(d) for d in diameters)
        if len(self._seen) > self.window:
            del self._seen[: len(self._seen) - self.window]

    @property
    def diameter(self) -> float | None:
        if self.fixed:
            return float(self.fixed)
        return float(np.median(self._seen)) if self._seen else None

    def box_for(self, box: Box) -> Box:
        """``box`` re-centred with the session's diameter (its own where none is known yet)."""
        d = self.diameter or box.diameter
        cx, cy = box.centre
        return Box(int(round(cx - d / 2)), int(round(cy - d / 2)), int(round(d)), int(round(d)))


class SessionLamp:
    """White balance of a session onto the model's training lamp (``contract.lamp``).

    Like the magnification, the lamp's colour and the camera's white balance belong to the
    microscope, not to a cell: the session's background level per channel is the running median of
    each field's (:func:`bmc.contract.lamp_of`), and every cell is scaled by one gain per channel so
    that the background matches the training images' before the contract's normalisation. Measured
    on BCCD, a microscope the model never saw, this lifted its white cells' balanced accuracy
    (``benchmarks/README.md``). No lamp in the card, or ``enabled=False``: cells pass unchanged.
    """

    def __init__(self, lamp_rgb: Sequence[float] | None, enabled: bool = True, window: int = 101):
        self.lamp = np.asarray(lamp_rgb, np.float32) if (enabled and lamp_rgb is not None) else None
        self.window = window
        self._seen: list[np.ndarray] = []
        self.seen: np.ndarray | None = None  # the session's background level, RGB (None: no colour frame yet)

    @property
    def active(self) -> bool:
        return self.lamp is not None

    def observe(self, frame: np.ndarray) -> list[float] | None:
        """Take a BGR frame's background level (RGB) into the session's; returns it (None: inactive)."""
        if self.active and frame.ndim == 3:
            level = [float(v) for v in lamp_of(frame)[::-1]]
            self.take(level)
            return level
        return None

    def take(self, level: Sequence[float]) -> None:
        """One frame's background level (RGB), measured now or replayed from a resumed session."""
        self._seen.append(np.asarray(level, np.float32))
        del self._seen[: -self.window]
        self.seen = np.median(self._seen, axis=0)

    def balance(self, crop: np.ndarray) -> np.ndarray:
        """A BGR crop scaled onto the training lamp."""
        seen, lamp = self.seen, self.lamp
        if seen is None or lamp is None or crop.ndim != 3:
            return crop
        return white_balance(crop, seen[::-1], [float(v) for v in lamp[::-1]])
