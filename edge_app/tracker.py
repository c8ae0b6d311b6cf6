"""Counting each cell once while the field stands still or moves past the camera.

A live camera or a video shows the same field for many frames, and a technician surveys a smear
by moving the stage. A cell whose centre lies within ``match_fraction`` of its diameter from a
cell of the previous frames keeps that cell's track; a cell with no such neighbour starts a new
track. Tracks not seen for ``max_missing`` frames end (:attr:`CellTracker.ended`), so a moved
field brings new cells. Still images (each file its own field) are never matched across files.

A tracked cell is judged once, when its track ends, on its views wholly inside the frame
(:class:`TrackViews`): the average of their class probabilities, and the most central view's crop
and embedding — never on the first view of a cell entering at the edge, cut off. A cell that never
came wholly into view is not counted, and said as such.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bmc.edge_app.cells import Box


@dataclasses.dataclass
class _Track:
    id: int
    centre: tuple[float, float]
    diameter: float
    last_seen: int


class CellTracker:
    def __init__(self, match_fraction: float = 0.5, max_missing: int = 5):
        self.match_fraction = match_fraction
        self.max_missing = max_missing
        self.tracks: list[_Track] = []
        self.ended: list[int] = []  # the tracks the latest update ended
        self._next = 1

    def reset(self) -> None:
        self.tracks.clear()

    def update(self, frame_index: int, boxes: list[Box]) -> list[tuple[int, bool]]:
        """For each box: (track id, is_new). Greedy nearest-centre matching, one box per track. The
        tracks that ended before this frame are in :attr:`ended`."""
        self.ended = [t.id for t in self.tracks if frame_index - t.last_seen > self.max_missing]
        self.tracks = [t for t in self.tracks if frame_index - t.last_seen <= self.max_missing]
        pairs = []
        for bi, b in enumerate(boxes):
            cx, cy = b.centre
            for ti, t in enumerate(self.tracks):
                d = ((cx - t.centre[0]) ** 2 + (cy - t.centre[1]) ** 2) ** 0.5
                if d <= self.match_fraction * max(b.diameter, t.diameter):
                    pairs.append((d, bi, ti))
        pairs.sort()
        out: list[tuple[int, bool] | None] = [None] * len(boxes)
        used_t: set[int] = set()
        for _, bi, ti in pairs:
            if out[bi] is None and ti not in used_t:
                t = self.tracks[ti]
                t.centre, t.diameter, t.last_seen = boxes[bi].centre, boxes[bi].diameter, frame_index
                out[bi] = (t.id, False)
                used_t.add(ti)
        for bi, b in enumerate(boxes):
            if out[bi] is None:
                self.tracks.append(_Track(self._next, b.centre, b.diameter, frame_index))
                out[bi] = (self._next, True)
                self._next += 1
        return out  # type: ignore[return-value]


def whole_in_frame(box: Box, shape: tuple[int, ...], margin: int = 2) -> bool:
    """The cell's box lies inside the frame, clear of its border by ``margin`` pixels: a whole cell."""
    h, w = shape[:2]
    return bool(box.x >= margin and box.y >= margin and box.x + box.w <= w - margin and box.y + box.h <= h - margin)


@dataclasses.dataclass
class TrackViews:
    """What one tracked cell looked like while it was in view: its views wholly inside the frame
    (their probabilities summed) and the most central of them (its frame, box, crop, probabilities
    and embedding), which is the one recorded."""

    first_frame: int
    whole: int = 0
    prob_sum: np.ndarray | None = None
    # (distance to the frame's centre, frame, box, crop, probabilities, embedding)
    best: tuple[float, int, Box, np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def add(
        self,
        frame: int,
        box: Box,
        shape: tuple[int, ...],
        crop: np.ndarray,
        probs: np.ndarray,
        embedding: np.ndarray | None,
    ) -> None:
        if not whole_in_frame(box, shape):
            return
        self.whole += 1
        self.prob_sum = probs.astype(np.float64) if self.prob_sum is None else self.prob_sum + probs
        cx, cy = box.centre
        off = float(np.hypot(cx - shape[1] / 2, cy - shape[0] / 2))
        if self.best is None or off < self.best[0]:
            self.best = (off, frame, box, crop, probs, embedding)

    @property
    def probabilities(self) -> np.ndarray | None:
        """The average over the whole views (None: the cell was never wholly in view)."""
        return None if self.prob_sum is None else (self.prob_sum / self.whole).astype(np.float32)
